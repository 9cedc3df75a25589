"""Recomputed segments (llkern/nn/recompute.py) against the plain module they were made from.

Exactness is bitwise in float64: outputs, input and parameter gradients, BatchNorm running statistics (moved
once per step, not twice), dropout masks; gradcheck. Memory: the meter sees the segment inputs and the
recomputation, so a recomputed module's peak is below the plain one and at least its largest recomputed
segment. LocalNet (TRGL's residual protocol, memory_profile), DDP with find_unused_parameters, saving,
autocast and bad arguments.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import llkern
from llkern.local.memory import MemoryMeter
from llkern.models import digits_resnet
from llkern.nn.activation_memory import saved_tensors_in
from llkern.nn.recompute import RecomputedSequential, recompute_segments

from .distributed import file_init_method

F64 = torch.float64


def conv_stack(seed: int = 0, dropout: float = 0.3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(dropout),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1),
    ).to(F64)


def run_both(plain: nn.Module, recomputed: nn.Module, x: torch.Tensor, seed: int = 1):
    """Forward and backward of both from the same RNG state, on the same input and upstream gradient."""
    xs = [x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()]
    outputs = []
    for module, xi in zip((plain, recomputed), xs, strict=True):
        torch.manual_seed(seed)
        outputs.append(module(xi))
    grad = torch.randn_like(outputs[0])
    for out in outputs:
        out.backward(grad)
    return outputs, xs


def assert_bitwise_equal(plain: nn.Module, recomputed: nn.Module, outputs, xs) -> None:
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(xs[0].grad, xs[1].grad)
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(plain.named_buffers(), recomputed.buffers(), strict=True):
        assert torch.equal(b, c), name  # BatchNorm statistics moved once, as in the plain module


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("segments", [1, 2, 3, 5])
def test_bitwise_equal_to_the_plain_module(batch, segments):
    plain, recomputed = conv_stack(), recompute_segments(conv_stack(), segments)
    assert recomputed.segments == segments
    x = torch.randn(batch, 3, 9, 11, dtype=F64)
    for _ in range(2):  # a second step starts from the statistics the first left
        assert_bitwise_equal(plain, recomputed, *run_both(plain, recomputed, x))
        for p, q in zip(plain.parameters(), recomputed.parameters(), strict=True):
            p.grad = q.grad = None


def test_non_contiguous_and_channels_last_inputs():
    plain, recomputed = conv_stack(), recompute_segments(conv_stack(), 3)
    x = torch.randn(6, 9, 11, 3, dtype=F64).permute(0, 3, 1, 2)  # channels_last strides
    assert not x.is_contiguous()
    assert_bitwise_equal(plain, recomputed, *run_both(plain, recomputed, x))
    x = torch.randn(4, 3, 9, 22, dtype=F64)[..., ::2]
    assert_bitwise_equal(plain, recomputed, *run_both(plain, recomputed, x))


def test_dropout_draws_the_same_mask_only_when_the_rng_is_restored():
    plain = conv_stack(dropout=0.5)
    x = torch.randn(4, 3, 9, 11, dtype=F64)
    kept = recompute_segments(conv_stack(dropout=0.5), 3)  # dropout (child 3) inside a recomputed segment
    assert kept.boundaries[-2] > 3  # dropout (child 3) is in a recomputed segment, not the last one
    assert_bitwise_equal(plain, kept, *run_both(plain, kept, x))
    for p in plain.parameters():
        p.grad = None
    lost = recompute_segments(conv_stack(dropout=0.5), 3, preserve_rng_state=False)
    outputs, xs = run_both(plain, lost, x)
    assert torch.equal(outputs[0], outputs[1])  # the forward is the same; its backward draws another mask
    assert not torch.equal(xs[0].grad, xs[1].grad)


def test_gradcheck():
    torch.manual_seed(0)
    module = recompute_segments(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(),
                                              nn.Linear(6, 3)).to(F64), 3)
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    # the parameters themselves are gradcheck's inputs: it perturbs them in place, and the module reads them
    assert torch.autograd.gradcheck(lambda x, *params: module(x), (x, *module.parameters()))


def test_functional_call_gives_the_swapped_in_parameters_their_gradients():
    # torch.func.functional_call swaps tensors in for the forward only: the recomputation in the backward must use
    # them too (with the module's own, the swapped-in tensors got no gradient at all)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    recomputed = recompute_segments(copy.deepcopy(plain), 3)
    x = torch.randn(5, 3, dtype=F64)
    swapped = [{n: p.detach().mul(2).requires_grad_() for n, p in plain.named_parameters()} for _ in range(2)]
    swapped[1] = {n: t.detach().clone().requires_grad_() for n, t in swapped[0].items()}
    for module, tensors in zip((plain, recomputed), swapped, strict=True):
        torch.func.functional_call(module, tensors, (x,)).sum().backward()
    for name in swapped[0]:
        assert swapped[1][name].grad is not None, name
        assert torch.equal(swapped[0][name].grad, swapped[1][name].grad), name
    assert all(p.grad is None for p in recomputed.parameters())


def test_the_meter_sees_segment_inputs_and_the_recomputation():
    x = torch.randn(16, 3, 16, 16, dtype=F64)
    plain, recomputed = conv_stack(dropout=0.0), recompute_segments(conv_stack(dropout=0.0), 3)

    def peak(module: nn.Module, inputs: torch.Tensor) -> int:
        with MemoryMeter(exclude=[*module.parameters(), inputs]) as meter:
            module(inputs).sum().backward()
        return meter.peak_saved_bytes

    whole = peak(plain, x)
    with_recompute = peak(recomputed, x)
    assert with_recompute < 0.75 * whole
    # while segment i is recomputed its own saved tensors are alive: the peak is at least the largest of them
    h = x.detach().requires_grad_()
    largest = 0
    for lo, hi in zip(recomputed.boundaries[:-2], recomputed.boundaries[1:-1], strict=True):
        segment = nn.Sequential(*list(plain)[lo:hi])
        largest = max(largest, peak(segment, h))
        h = segment(h).detach().requires_grad_()
    assert with_recompute >= largest > 0
    # torch.utils.checkpoint saves and recomputes through its own hooks: the meter sees none of it
    with MemoryMeter(exclude=[*plain.parameters(), x]) as meter:
        torch.utils.checkpoint.checkpoint(plain, x, use_reentrant=False).sum().backward()
    assert meter.peak_saved_bytes < largest


def test_saved_tensors_in_stores_the_recomputation_in_16_bits():
    # one recomputed segment, then a Flatten that saves nothing: the peak is the recomputation's, in the backward
    layers = conv_stack(dropout=0.0).float()
    module = RecomputedSequential(nn.Sequential(*layers, nn.Flatten()), [0, len(layers), len(layers) + 1])
    x = torch.randn(16, 3, 16, 16)
    peaks = []
    for dtype in (None, torch.bfloat16):
        with MemoryMeter(exclude=[*module.parameters(), x]) as meter:
            with saved_tensors_in(dtype) if dtype is not None else torch.enable_grad():
                out = module(x)
                # the forward saved only x: excluded, or its bfloat16 copy
                assert meter.peak_saved_bytes == (0 if dtype is None else 2 * x.numel())
                out.sum().backward()
        peaks.append(meter.peak_saved_bytes)
    # half, plus x twice in bfloat16 (the stored input, and the recomputation's first conv saving its unpacked copy),
    # which the float32 run excludes as x's own storage; give or take the per-channel statistics (kept as they are)
    assert abs(peaks[1] - (peaks[0] / 2 + 2 * 2 * x.numel())) < 0.01 * peaks[0]


def test_example_input_balances_saved_bytes_and_never_starts_at_an_in_place_child():
    # one wide layer first, then narrow ones: equal counts put the wide layer with others, measured cuts isolate it
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Tanh(), nn.Conv2d(64, 4, 1), nn.Tanh(),
                           nn.Conv2d(4, 4, 1), nn.Tanh(), nn.Conv2d(4, 4, 1), nn.ReLU(inplace=True),
                           nn.Conv2d(4, 4, 1), nn.Tanh())
    x = torch.randn(8, 3, 12, 12)
    equal = recompute_segments(module, 2)
    measured = recompute_segments(module, 2, example_input=x)
    assert equal.boundaries == [0, 5, 10]
    assert measured.boundaries[1] < equal.boundaries[1]
    cut = recompute_segments(module, 4)
    assert 7 not in cut.boundaries  # the in-place ReLU would overwrite its segment's saved input
    assert_bitwise_equal(module, measured, *run_both(module, measured, x))


def digits_blocks(recompute: bool) -> list[nn.Module]:
    """digits_resnet's two modules in float64 from seed 0, each cut into 2 recomputed segments or left plain."""
    torch.manual_seed(0)
    blocks = [b.to(F64) for b in digits_resnet(2, width=8)]
    return [recompute_segments(b, 2) for b in blocks] if recompute else blocks


def test_local_net_trains_identically_with_recomputed_modules_and_residual_penalties():
    # TRGL's per-block penalty needs every block's residual branch: RecomputedSequential reports them itself
    x, y = torch.randn(12, 1, 8, 8, dtype=F64), torch.randint(0, 10, (12,))
    nets = []
    for recompute in (False, True):
        blocks = digits_blocks(recompute)
        torch.manual_seed(0)
        nets.append(llkern.LocalNet(blocks, num_classes=10, example_input=x[:2],
                                    losses=llkern.TransportRegularized(tau=0.5)).to(F64))
    results = [net.local_step(x, y) for net in nets]
    assert results[0].losses == results[1].losses
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        assert p.grad is None or torch.equal(p.grad, q.grad), name
    # the penalty is there: without it the losses differ
    penalised = [r.losses for r in results]
    blocks = digits_blocks(True)
    torch.manual_seed(0)  # the same weights and heads, cross-entropy only
    plain_ce = llkern.LocalNet(blocks, num_classes=10, example_input=x[:2]).to(F64)
    unpenalised = plain_ce.local_step(x, y).losses
    assert all(p > u for p, u in zip(penalised[1], unpenalised, strict=True))


def test_memory_profile_counts_the_recomputation_in_the_backward():
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    torch.manual_seed(0)
    plain = llkern.LocalNet(digits_resnet(2, width=16), num_classes=10, example_input=x[:2])
    recomputed = copy.deepcopy(plain)
    recomputed.blocks = nn.ModuleList([recompute_segments(b, 3) for b in recomputed.blocks])
    rows = [net.memory_profile(x, y) for net in (plain, recomputed)]
    for before, after in zip(*rows, strict=True):
        assert after.peak_saved_bytes < before.peak_saved_bytes
    # the backward's recomputation is in the peak: at least the largest recomputed segment of module 1, whose
    # input is a detached boundary (so the first segment's saved tensors are those of the plain segment)
    first = nn.Sequential(*list(recomputed.blocks[1])[:recomputed.blocks[1].boundaries[1]])
    with torch.no_grad():
        h = recomputed.blocks[0](x)
    with MemoryMeter(exclude=[*first.parameters(), h]) as meter:
        first(h).sum().backward()
    assert rows[1][1].peak_saved_bytes >= meter.peak_saved_bytes > 0


def test_eval_and_no_grad_run_plainly():
    module = recompute_segments(conv_stack(), 3).eval()
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    with torch.no_grad():
        assert module(x).grad_fn is None
    with torch.inference_mode():
        assert torch.equal(module(x), conv_stack().eval()(x))


def test_autocast_is_restored_in_the_recomputation():
    plain, recomputed = conv_stack(dropout=0.0).float(), recompute_segments(conv_stack(dropout=0.0).float(), 3)
    x = torch.randn(4, 3, 9, 9)
    outputs, xs = [], []
    for module in (plain, recomputed):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(xi)
        out.float().sum().backward()
        outputs.append(out)
        xs.append(xi)
    assert outputs[0].dtype == torch.bfloat16
    assert_bitwise_equal(plain, recomputed, outputs, xs)


def test_keeps_children_names_parameters_and_pickles(tmp_path):
    module = conv_stack()
    params = list(module.parameters())
    recomputed = recompute_segments(module, 3)
    assert list(recomputed.state_dict()) == list(module.state_dict())
    assert all(p is q for p, q in zip(params, recomputed.parameters(), strict=True))
    assert type(recomputed[1:3]) is nn.Sequential and len(recomputed[1:3]) == 2
    assert "boundaries=[0, 3, 6, 10]" in repr(recomputed) or "boundaries=" in repr(recomputed)
    torch.save(recomputed, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert isinstance(loaded, RecomputedSequential) and loaded.boundaries == recomputed.boundaries
    again = recompute_segments(recomputed, 2)  # a RecomputedSequential can be cut again
    assert again.segments == 2 and list(again.state_dict()) == list(module.state_dict())


def test_double_backward_is_refused():
    module = recompute_segments(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64), 2)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


def test_in_place_write_into_a_segment_input_is_refused():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    manual = RecomputedSequential(module, [0, 1, 2, 3])  # segment 1 (recomputed) is the in-place ReLU
    with pytest.raises(RuntimeError, match="wrote into its input in place"):
        manual(torch.randn(3, 4))
    with pytest.raises(ValueError, match="inplace=True"):
        recompute_segments(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 2)), 2)


@pytest.mark.parametrize(("module", "kwargs", "error", "match"), [
    (nn.Linear(2, 2), {"segments": 1}, TypeError, "expected module to be an nn.Sequential"),
    (llkern.models.PreActBlock(4, 4), {"segments": 1}, TypeError, "own forward"),
    (nn.Sequential(nn.Linear(2, 2)), {"segments": 0}, ValueError, "segments"),
    (nn.Sequential(nn.Linear(2, 2)), {"segments": 2}, ValueError, "segments"),
    (nn.Sequential(nn.Linear(2, 2)), {"segments": True}, ValueError, "segments"),
    (nn.Sequential(nn.Linear(2, 2)), {"segments": 1, "preserve_rng_state": 1}, TypeError, "preserve_rng_state"),
    (nn.Sequential(nn.Linear(2, 2)), {"segments": 1, "example_input": [1.0]}, TypeError, "example_input"),
])
def test_bad_arguments(module, kwargs, error, match):
    with pytest.raises(error, match=match):
        recompute_segments(module, **kwargs)


def test_changed_children_and_bad_boundaries_are_named():
    module = recompute_segments(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)), 2)
    module.append(nn.Tanh())
    with pytest.raises(RuntimeError, match="children were added or removed"):
        module(torch.randn(1, 2))
    with pytest.raises(ValueError, match="boundaries"):
        RecomputedSequential(nn.Sequential(nn.Linear(2, 2), nn.Tanh()), [0, 1, 1, 2])


def test_ddp_with_unused_parameter_search(tmp_path):
    # the segments' parameters are inputs of the recompute node: DDP finds them in the graph, and each gradient is
    # accumulated once (a nested backward accumulating them itself would mark them ready twice)
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=file_init_method(tmp_path))
    try:
        x, y = torch.randn(16, 1, 8, 8, dtype=F64), torch.randint(0, 10, (16,))
        nets = []
        for recompute in (False, True):
            net = llkern.LocalNet(digits_blocks(recompute), num_classes=10, example_input=x[:2]).to(F64)
            trainer = llkern.LocalTrainer(net, distributed=True, find_unused_parameters=True,
                                          optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
            for _ in range(2):
                trainer.step(x, y)
            nets.append(net)
            del trainer
        for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters(), strict=True):
            assert torch.equal(p, q), name
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_compile_runs_it():
    plain, recomputed = conv_stack(dropout=0.0), recompute_segments(conv_stack(dropout=0.0), 3)
    compiled = torch.compile(recomputed)
    x = torch.randn(4, 3, 9, 9, dtype=F64)
    outputs, xs = run_both(plain, compiled, x)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-12, atol=1e-12)
    for p, q in zip(plain.parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


def test_a_module_repeated_in_the_sequential_keeps_all_its_places():
    # nn.Sequential(a, tanh, a, ...) runs a twice (weight sharing): named_children() lists it once, so the
    # recomputed module lost the repeated children (and refused its own boundaries with a confusing error)
    def shared() -> nn.Sequential:
        torch.manual_seed(0)
        a = nn.Linear(4, 4).to(F64)
        return nn.Sequential(a, nn.Tanh(), nn.Linear(4, 4).to(F64), nn.Tanh(), a, nn.Tanh(), a, nn.Tanh())

    plain = shared()
    for recomputed in (recompute_segments(shared(), 3), RecomputedSequential(shared(), [0, 2, 4, 6, 8])):
        assert len(recomputed) == len(plain) == 8
        assert recomputed[0] is recomputed[4] is recomputed[6]
        assert_bitwise_equal(plain, recomputed, *run_both(plain, recomputed, torch.randn(5, 4, dtype=F64)))
        for p in plain.parameters():
            p.grad = None


def test_a_buffer_the_forward_reads_and_moves_starts_the_recomputation_as_in_the_forward():
    # spectral_norm's power iteration updates its buffers u, v in the forward and normalises the weight with them:
    # a recomputation from the updated buffers iterated once more and normalised by another sigma (other gradients)
    def normed() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(nn.Linear(4, 6)), nn.Tanh(),
                             nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)

    plain, recomputed = normed(), recompute_segments(normed(), 2)
    assert recomputed.boundaries == [0, 2, 5]  # the spectral-normed layer is recomputed
    x = torch.randn(5, 4, dtype=F64)
    for _ in range(2):
        assert_bitwise_equal(plain, recomputed, *run_both(plain, recomputed, x))  # u and v moved once
        for p, q in zip(plain.parameters(), recomputed.parameters(), strict=True):
            p.grad = q.grad = None


@pytest.mark.slow
def test_torch_compile_recomputes_the_dropout_mask_of_the_forward():
    # a compiled forward draws its dropout masks from the compiler's own random numbers, while the recomputation
    # (in the eager backward) drew the eager mask: the gradient used a mask the forward did not
    module = RecomputedSequential(nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5), nn.Identity()).to(F64), [0, 2, 3])
    nn.init.eye_(module[0].weight)
    nn.init.zeros_(module[0].bias)
    compiled = torch.compile(module)
    x = (torch.rand(50, 6, dtype=F64) + 1).requires_grad_()
    out = compiled(x)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).to(F64) * 2)  # dropout(x)'s gradient: the forward's mask, scaled


def test_torch_func_transforms_run_it():
    # an autograd.Function without setup_context cannot run under vmap or grad: the segments run plainly there
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    recomputed = recompute_segments(copy.deepcopy(plain), 3)
    x = torch.randn(5, 4, dtype=F64)
    assert torch.equal(torch.func.vmap(recomputed)(x), torch.func.vmap(plain)(x))
    grads = [torch.func.grad(lambda p, m=m: torch.func.functional_call(m, p, (x,)).sum())(
        {n: p.detach() for n, p in m.named_parameters()}) for m in (plain, recomputed)]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_lazy_modules_materialise_in_their_first_forward():
    # a lazy parameter passed to the recompute node before its first forward gave it its shape: the backward
    # then failed on a gradient of another shape
    torch.manual_seed(0)
    module = recompute_segments(nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.LazyLinear(3), nn.Tanh(),
                                              nn.Linear(3, 2)), 3)
    x = torch.randn(5, 7)
    for _ in range(2):  # the first step materialises, the second recomputes
        module(x).sum().backward()
        assert all(p.grad is not None and p.grad.shape == p.shape for p in module.parameters())


def test_runs_on_the_meta_device():
    # llkern.split measures saved bytes on the meta device, which has no autocast state to record
    module = recompute_segments(conv_stack(), 3).to("meta")
    x = torch.randn(2, 3, 9, 9, dtype=F64, device="meta", requires_grad=True)
    with MemoryMeter(exclude=[*module.parameters(), x]) as meter:
        module(x).sum().backward()
    assert x.grad.shape == x.shape and meter.peak_saved_bytes > 0
    plan = llkern.split(nn.Sequential(module, nn.Conv2d(5, 5, 1).to(device="meta", dtype=F64)), 2, by="saved_bytes",
                        example_input=x.detach())
    assert len(plan.unit_costs) == 2


def test_no_segment_starts_at_a_nested_in_place_layer():
    # a child Sequential that starts with an in-place ReLU writes into its input as the ReLU itself does
    module = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4)), nn.Tanh(),
                           nn.Linear(4, 2))
    recomputed = recompute_segments(module, 3)
    assert 1 not in recomputed.boundaries
    recomputed(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ValueError, match="inplace=True"):
        recompute_segments(nn.Sequential(nn.Sequential(nn.ReLU(inplace=True)), nn.Linear(4, 2)), 2)
    with pytest.raises(ValueError, match="no children"):
        recompute_segments(nn.Sequential(), 1)


class WritesItsInput(nn.Module):
    """A block whose own forward starts with an in-place write into its input (no ``inplace`` attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.relu_())


def test_a_child_seen_writing_into_its_input_starts_no_segment():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), WritesItsInput(), nn.Tanh(), nn.Linear(4, 4),
                           nn.Tanh())
    x = torch.randn(5, 4)
    plan = llkern.split(module, 1, example_input=x, flatten=False, allow_affine_end=True)
    assert plan.unit_writes_input == [False, False, False, True, False, False, False]
    assert llkern.split(module, 1, by="layers").unit_writes_input is None  # not run: not known
    # without a measurement the block is not known to write: a cut there is refused when the forward runs
    with pytest.raises(RuntimeError, match="wrote into its input in place"):
        recompute_segments(module, 7)(x.clone().requires_grad_())
    measured = recompute_segments(module, 6, example_input=x)
    assert 3 not in measured.boundaries and measured.segments == 6
    assert_bitwise_equal(module, measured, *run_both(module, measured, x))
    assert llkern.recompute_modules([module], 7, example_input=x)[0].segments == 6  # clamped to what it allows
    with pytest.raises(ValueError, match="more than the 6 this module allows"):
        recompute_segments(module, 7, example_input=x)
    with pytest.raises(ValueError, match="starts with WritesItsInput, whose forward writes into its input"):
        recompute_segments(nn.Sequential(WritesItsInput(), nn.Linear(4, 2)), 2, example_input=x)


def test_a_pass_through_child_before_an_in_place_one_starts_no_segment():
    # nn.Identity hands its input on: the in-place ReLU after it overwrites the Identity's input too
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Identity(), nn.ReLU(inplace=True),
                           nn.Linear(4, 4), nn.Tanh())
    x = torch.randn(5, 4)
    plan = llkern.split(module, 1, example_input=x, flatten=False, allow_affine_end=True)
    assert plan.unit_writes_input == [False, False, False, True, True, False, False]
    assert plan.unit_input_writers == [None, None, None, 4, 4, None, None]
    measured = recompute_segments(module, 5, example_input=x)
    assert not {3, 4} & set(measured.boundaries)
    assert_bitwise_equal(module, measured, *run_both(module, measured, x))
    fit = llkern.fit_memory(module, 2**40, example_input=x, segments=(5,))  # measured cuts: the forward runs
    assert fit.segments == 5 and not {3, 4} & set(fit.modules[0].boundaries)
    fit.modules[0](x.clone().requires_grad_()).sum().backward()


def test_moda_losses_refuse_recomputed_segments():
    # MODA's terms read the ReLU outputs with their graphs in the forward: a recomputed segment has none there
    from llkern.moda import MODALocalLoss, MODALoss

    block = recompute_segments(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU()), 2)
    with pytest.raises(ValueError, match=r"MODALocalLoss: .*RecomputedSequential"):
        MODALocalLoss(block)
    with pytest.raises(ValueError, match=r"MODALoss: .*RecomputedSequential"):
        MODALoss(nn.Sequential(block, nn.Linear(4, 2)))
    MODALocalLoss(recompute_segments(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 1))  # one segment: nothing recomputed


@pytest.mark.parametrize("segments", [1, 2, 5])
def test_recompute_modules_measures_each_module_on_its_own_input_and_clamps_segments(segments):
    torch.manual_seed(0)
    modules = [nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Tanh(), nn.Conv2d(32, 4, 1), nn.Tanh(),
                             nn.Conv2d(4, 4, 1)),
               nn.Sequential(nn.Tanh(), nn.Conv2d(4, 4, 1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1))]
    bn = nn.BatchNorm2d(4)
    modules[0].append(bn)
    x = torch.randn(8, 3, 10, 10)
    statistics = bn.running_mean.clone()
    out = llkern.recompute_modules(modules, segments, example_input=x)
    assert torch.equal(bn.running_mean, statistics) and all(m.training for m in bn.modules())  # nothing moved
    assert [m.segments for m in out] == [min(segments, 6), min(segments, 3)]  # module 1: no cut at the in-place ReLU
    if segments == 2:  # measured on module 0's input: the wide first conv alone
        assert out[0].boundaries == recompute_segments(modules[0], 2, example_input=x).boundaries
        assert out[0].boundaries[1] < 3
    with pytest.raises(ValueError, match="recompute_modules: expected segments"):
        llkern.recompute_modules(modules, 0)
    with pytest.raises(TypeError, match=r"recompute_modules: module 1: .*nn\.Sequential"):
        llkern.recompute_modules([modules[0], nn.Linear(2, 2)], 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_restores_the_device_generator_and_autocast(autocast):
    # the CUDA generator's state is kept per segment and restored for the recomputation: dropout on the GPU draws
    # the same mask again (with another mask the gradients would differ by O(1), far above any rounding)
    def mlp() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(33, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 64), nn.Tanh(),
                             nn.Dropout(0.3), nn.Linear(64, 7)).cuda()

    plain, recomputed = mlp(), recompute_segments(mlp(), 3)
    assert recomputed.boundaries[-2] > 5  # both dropouts in recomputed segments
    x = torch.randn(97, 33, device="cuda")
    grads = []
    for module in (plain, recomputed):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = module(xi)
        out.float().square().sum().backward()
        grads.append([xi.grad, *(p.grad for p in module.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
