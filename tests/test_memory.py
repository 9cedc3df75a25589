"""MemoryMeter: distinct-storage counting, parameter exclusion, and local vs end-to-end peaks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llkern
from llkern.local.memory import MemoryMeter
from llkern.models import digits_resnet


def test_counts_a_storage_saved_twice_once():
    a = torch.randn(1000, requires_grad=True)
    with MemoryMeter() as meter:
        (a * a).sum().backward()  # mul saves `a` as both operands
    assert meter.peak_saved_bytes == 4000
    assert meter.current_saved_bytes == 0  # released by the backward


def test_counts_distinct_storages_and_views():
    a = torch.randn(1000, requires_grad=True)
    with MemoryMeter() as meter:
        b = a.exp()            # saves its output b (4000 bytes)
        c = b[:500].sin()      # saves a view of b: same storage, not counted again
        d = a.cos()            # saves a (a distinct 4000 bytes)
        loss = c.sum() + d.sum()
        assert meter.current_saved_bytes == 8000
        loss.backward()
    assert meter.peak_saved_bytes == 8000 and meter.current_saved_bytes == 0


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_counts_a_saved_sparse_tensor_by_its_indices_and_values(layout):
    indices = torch.tensor([[0, 1, 2, 2, 4], [1, 0, 2, 4, 3]])
    adjacency = torch.sparse_coo_tensor(indices, torch.rand(5), (5, 5)).coalesce()
    if layout == "csr":
        adjacency = adjacency.to_sparse_csr()
        parts = [adjacency.crow_indices(), adjacency.col_indices(), adjacency.values()]
    else:
        parts = [adjacency.indices(), adjacency.values()]
    x = torch.randn(5, 3, requires_grad=True)
    with MemoryMeter() as meter:
        y = torch.sparse.mm(adjacency, x)  # saves the sparse matrix for x's gradient
        assert meter.current_saved_bytes == sum(p.untyped_storage().nbytes() for p in parts)
        y.sum().backward()
    assert meter.current_saved_bytes == 0
    torch.testing.assert_close(x.grad, adjacency.to_dense().t() @ torch.ones(5, 3))


def test_graph_dropped_without_backward_is_released():
    a = torch.randn(1000, requires_grad=True)
    with MemoryMeter() as meter:
        b = a.exp()  # saves its own output
        assert meter.current_saved_bytes == 4000
        del b  # the graph goes without a backward
    assert meter.current_saved_bytes == 0 and meter.peak_saved_bytes == 4000


def test_parameters_are_excluded():
    linear = nn.Linear(64, 32)
    x = torch.randn(16, 64, requires_grad=True)
    with MemoryMeter() as meter:  # nn.Linear saves weight.t(), a view of a parameter: not counted
        linear(x).sum().backward()
    assert meter.peak_saved_bytes == x.numel() * 4  # the input only
    lazy = nn.LazyLinear(8)
    with MemoryMeter(exclude=lazy.parameters()) as meter:  # uninitialised parameters are skipped
        lazy(x).sum().backward()
    assert meter.peak_saved_bytes == x.numel() * 4
    w = torch.randn(32, 64, requires_grad=True)  # a plain tensor: excluded by storage
    with MemoryMeter(exclude=[w]) as meter:
        F.linear(x, w.t().t()).sum().backward()
    assert meter.peak_saved_bytes == x.numel() * 4


def test_report_string():
    a = torch.randn(2**18, requires_grad=True)
    with MemoryMeter() as meter:
        a.exp().sum().backward()
    assert meter.report().peak_saved_bytes == 2**20
    assert "1.00 MiB" in str(meter.report())


# --- composition with other saved-tensor hooks: only the innermost pair runs, so each hands on to the one outside ---


def _conv_step(model: nn.Module, x: torch.Tensor, contexts) -> tuple[list[int], list[torch.Tensor]]:
    """One forward and backward of ``model`` inside ``contexts`` (entered in order); the peaks of the meters among
    them and the gradients."""
    import contextlib

    model.zero_grad()
    with contextlib.ExitStack() as stack:
        entered = [stack.enter_context(c) for c in contexts]
        model(x).sum().backward()
    meters = [c for c in entered if isinstance(c, MemoryMeter)]
    assert all(m.current_saved_bytes == 0 for m in meters)  # all released by the backward
    return [m.peak_saved_bytes for m in meters], [p.grad.clone() for p in model.parameters()]


def _conv_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1))


def test_a_meter_inside_saved_tensors_in_hands_on_to_it_and_counts_the_16_bit_copies():
    # LocalTrainer enters a meter for every epoch: inside a user's saved_tensors_in it used to switch the conversion
    # off (the same losses and peak as without it); both orders now convert, count the same bytes and agree bitwise
    from llkern.activation_memory import saved_tensors_in

    model, x = _conv_model(), torch.randn(8, 4, 10, 10)
    def meter() -> MemoryMeter:
        return MemoryMeter(exclude=model.parameters())

    (full,), plain = _conv_step(model, x, [meter()])
    (inner,), inside = _conv_step(model, x, [saved_tensors_in(torch.bfloat16), meter()])
    (outer,), outside = _conv_step(model, x, [meter(), saved_tensors_in(torch.bfloat16)])
    assert inner == outer == full // 2  # (x and two ReLU outputs, each stored once in bf16)
    assert all(torch.equal(a, b) for a, b in zip(inside, outside, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(inside, plain, strict=True))  # the rounded copies were used


def test_nested_meters_both_count():
    model, x = _conv_model(), torch.randn(8, 4, 10, 10)
    (alone,), plain = _conv_step(model, x, [MemoryMeter(exclude=model.parameters())])
    peaks, grads = _conv_step(model, x, [MemoryMeter(exclude=model.parameters()),
                                         MemoryMeter(exclude=model.parameters())])
    assert peaks == [alone, alone] and all(torch.equal(a, b) for a, b in zip(grads, plain, strict=True))


def test_a_meter_entered_again_inside_itself_counts_once_and_keeps_handing_on():
    from llkern.activation_memory import saved_tensors_in

    a = torch.randn(4096, requires_grad=True)
    meter = MemoryMeter()
    with meter:
        with meter:  # (its own hooks are on top: they must not become its outer hooks)
            b = a.exp()
        c = a.sin()
        assert meter.current_saved_bytes == 2 * 4096 * 4  # exp's output and sin's input
        (b + c).sum().backward()
    assert meter.peak_saved_bytes == 2 * 4096 * 4 and meter.current_saved_bytes == 0
    with saved_tensors_in(torch.bfloat16), meter:
        with meter:
            b = a.exp()
        c = a.cos()  # after the inner exit: still handed on to saved_tensors_in
        assert meter.current_saved_bytes == 2 * 4096 * 2  # both in bf16
        (b + c).sum().backward()
    assert meter.current_saved_bytes == 0


def test_a_meter_inside_foreign_hooks_counts_the_tensor_and_uses_their_unpack():
    # a handle that does not say what it holds (a tuple here): the tensor given is counted
    packed, unpacked = [], []

    def pack(tensor):
        packed.append(tensor.shape)
        return ("box", tensor)

    def unpack(handle):
        unpacked.append(handle[0])
        return handle[1]

    a = torch.randn(1000, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack), MemoryMeter() as meter:
        a.exp().sum().backward()
    assert packed == [torch.Size([1000])] and unpacked == ["box"]
    assert meter.peak_saved_bytes == 4000 and meter.current_saved_bytes == 0
    torch.testing.assert_close(a.grad, a.detach().exp())


def test_local_trainer_inside_saved_tensors_in_stores_16_bit_copies():
    from llkern.activation_memory import saved_tensors_in

    x, y = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))
    rows = []
    for low in (False, True):
        torch.manual_seed(0)
        net = llkern.LocalNet(digits_resnet(4, width=16), num_classes=10, example_input=x[:2])
        trainer = llkern.LocalTrainer(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        if low:
            with saved_tensors_in(torch.bfloat16):
                rows.append(trainer.fit((x, y), epochs=1, batch_size=64, progress=False)[-1])
        else:
            rows.append(trainer.fit((x, y), epochs=1, batch_size=64, progress=False)[-1])
    assert rows[1]["peak_saved_bytes"] < 0.55 * rows[0]["peak_saved_bytes"]
    assert rows[1]["loss"] != rows[0]["loss"]  # the backward read rounded activations
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-2)


def _module_saved_bytes(net, x, y):
    """Saved bytes of each module (with its head) alone, on the detached output of the previous one."""
    sizes, boundary_sizes, h = [], [], x
    for block, head in zip(net.blocks, net.heads, strict=True):
        with MemoryMeter(exclude=net.parameters()) as meter:
            out = block(h.detach())
            head.loss(out, y)[0].backward()  # the fused head, as local_step uses it
        sizes.append(meter.peak_saved_bytes)
        boundary_sizes.append(out.numel() * out.element_size())
        h = out.detach()
    return sizes, boundary_sizes


def test_local_step_peak_is_the_largest_module_not_the_sum():
    torch.manual_seed(0)
    net = llkern.LocalNet(digits_resnet(4, width=16), num_classes=10, example_input=torch.randn(2, 1, 8, 8))
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    sizes, boundaries = _module_saved_bytes(net, x, y)
    with MemoryMeter(exclude=net.parameters()) as local:
        net.local_step(x, y)
    end_to_end = nn.Sequential(*net.blocks, net.heads[-1])
    with MemoryMeter(exclude=net.parameters()) as e2e:
        F.cross_entropy(end_to_end(x), y).backward()
    assert local.peak_saved_bytes <= max(sizes) + max(boundaries)
    assert local.peak_saved_bytes >= max(sizes)
    # End to end holds every module's activations at once: the sum, less the K-1 small heads
    # it does not run.
    assert e2e.peak_saved_bytes >= 0.98 * sum(sizes)
    assert local.peak_saved_bytes < 0.5 * e2e.peak_saved_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_allocator_peak_local_vs_end_to_end():
    torch.manual_seed(0)
    net = llkern.LocalNet(digits_resnet(4, width=32), num_classes=10,
                          example_input=torch.randn(2, 1, 8, 8)).cuda()
    x, y = torch.randn(512, 1, 8, 8, device="cuda"), torch.randint(0, 10, (512,), device="cuda")
    net.local_step(x, y)  # warm-up: gradients and workspaces allocated
    with MemoryMeter(exclude=net.parameters()) as local:
        net.local_step(x, y)
    end_to_end = nn.Sequential(*net.blocks, net.heads[-1])
    with MemoryMeter(exclude=net.parameters()) as e2e:
        F.cross_entropy(end_to_end(x), y).backward()
    assert local.cuda_peak_bytes is not None and e2e.cuda_peak_bytes is not None
    assert 0 < local.cuda_peak_bytes < 0.6 * e2e.cuda_peak_bytes
    assert local.peak_saved_bytes < 0.5 * e2e.peak_saved_bytes


def test_cpu_buffer_cache_reuses_and_empties():
    import llkern.local.memory as memory

    if not llkern.extension_loaded():
        pytest.skip("llkern._C not built")
    memory.empty_cpu_buffer_cache()
    assert memory.cpu_buffer_cache_bytes() == 0
    y = torch.randn(2**21, requires_grad=True)  # an 8 MiB gradient: from the cache
    llkern.transport_penalty(y, impl="kernel").backward()
    first = y.grad.data_ptr()
    expected = y.grad.clone()
    y.grad = None  # the block goes back to the cache
    assert memory.cpu_buffer_cache_bytes() == 8 * 2**20
    llkern.transport_penalty(y, impl="kernel").backward()
    assert y.grad.data_ptr() == first and memory.cpu_buffer_cache_bytes() == 0  # reused
    torch.testing.assert_close(y.grad, expected)
    y.grad = None
    memory.empty_cpu_buffer_cache()
    assert memory.cpu_buffer_cache_bytes() == 0


def test_cpu_buffer_cache_evicts_the_oldest_beyond_its_limit():
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch, llkern, llkern.local.memory as memory
        MiB = 2**20
        for numel in (2 * MiB, 1536 * 1024):  # 8 MiB, then 6 MiB gradients
            y = torch.randn(numel, requires_grad=True)
            llkern.transport_penalty(y, impl="kernel").backward()
            y.grad = None
            print(memory.cpu_buffer_cache_bytes() // MiB)
    """)
    env = {**__import__("os").environ, "LLKERN_CPU_CACHE_MB": "10"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["8", "6"]  # the 8 MiB block made room for the 6 MiB one


def test_meta_storages_are_told_apart():
    """Every meta storage has data_ptr() 0: keyed by address, distinct storages were one, and excluding a
    parameter excluded every activation."""
    with torch.device("meta"):
        linear = nn.Linear(250, 250)
        a = torch.randn(1000, requires_grad=True)
        x = torch.randn(4, 250, requires_grad=True)
    with MemoryMeter(exclude=linear.parameters()) as meter:
        b = a.exp()        # saves its output b (4000 bytes)
        c = b[:500].sin()  # a view of b: not counted again
        d = a.cos()        # saves a: another 4000 bytes
        e = linear(x)      # saves x (4000 bytes), not the excluded weight
        assert meter.current_saved_bytes == 12000
        del b, c, d, e
    assert meter.current_saved_bytes == 0 and meter.peak_saved_bytes == 12000
