"""ContSup context supply in LocalNet: encoders, gradient isolation, boundaries, the Triton path,
cost report, errors, and training on digits."""

import pytest
import torch
import torch.nn.functional as F

import llkern
from llkern.data.images import load_digits
from llkern.models import digits_resnet
from llkern.nn.context import ContextSupply
from llkern.ops.context import triton_available

MODES = ("E", "R", "RE")


def make_net(mode, impl="reference", width=8, num_modules=4):
    torch.manual_seed(0)
    return llkern.LocalNet(digits_resnet(num_modules, width=width), num_classes=10,
                           example_input=torch.randn(2, 1, 8, 8), context=mode, context_impl=impl)


def batch(n=16):
    return torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))


def encoders(net, k):
    ctx = net.context
    params = []
    if "E" in ctx.mode:
        params += list(ctx.image_encoders[k - 1].parameters())
    if "R" in ctx.mode:
        params += list(ctx.previous_encoders[k - 1].parameters())
    return params


@pytest.mark.parametrize("mode", MODES)
def test_gradients_stay_local(mode):
    # Module k (block, head and its context encoders) gets exactly the gradient of its own loss
    # on detached inputs: recomputed here module by module.
    net = make_net(mode)
    x, y = batch()
    net.local_step(x, y)
    got = {k: [p.grad.clone() for p in [*net.blocks[k].parameters(), *net.heads[k].parameters(),
                                         *(encoders(net, k) if k else [])]] for k in range(4)}
    net.zero_grad()
    boundaries = [x]  # boundaries[k]: module k's input before the context is added
    for k in range(4):
        module_input = net._module_input(k, boundaries[k], x, boundaries[max(k - 1, 0)])
        out = net.blocks[k](module_input)
        loss = F.cross_entropy(net.heads[k](out), y)
        params = [*net.blocks[k].parameters(), *net.heads[k].parameters(), *(encoders(net, k) if k else [])]
        expected = torch.autograd.grad(loss, params)
        for g, e in zip(got[k], expected, strict=True):
            torch.testing.assert_close(g, e)
        boundaries.append(out.detach())


@pytest.mark.parametrize("mode", MODES)
def test_inference_uses_the_encoders_and_exits_agree(mode):
    net = make_net(mode).eval()
    x, _ = batch(8)
    logits = net.forward_all(x)
    for k in range(4):
        torch.testing.assert_close(net(x, exit=k), logits[k])
    before = net(x)
    with torch.no_grad():
        for p in encoders(net, 3):
            p.add_(0.5)
    assert not torch.allclose(net(x), before)  # the last module's context feeds the output


def test_boundaries_are_released_after_their_last_reader():
    net = make_net("RE")
    x, y = batch()
    result = net.local_step(x, y)
    assert all(b.released for b in result.boundaries)
    kept = net.local_step(x, y, keep_boundaries=True)
    assert not any(b.released for b in kept.boundaries)
    assert kept.boundaries[-1].tensor.shape == (16, 16, 4, 4)  # batch 16, 2 × width channels at 4×4


KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not triton_available(KERNEL_DEVICE),
                    reason="needs a GPU, or Triton's interpreter for CPU tensors (TRITON_INTERPRET=1, set when "
                           "there is no GPU)")
def test_triton_kernel_path_matches_reference():
    # the same step with the fused Triton add (on the GPU, or the interpreter on the CPU) and plain PyTorch
    x, y = (t.to(KERNEL_DEVICE) for t in batch(8))
    grads = []
    for impl in ("kernel", "reference"):
        net = make_net("RE", impl=impl).to(KERNEL_DEVICE)
        result = net.local_step(x, y)
        grads.append([p.grad for p in net.parameters()])
        assert all(loss > 0 for loss in result.losses)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cost_report():
    net = make_net("RE", width=8)
    cost = net.context.cost()
    # module 3's input is 16×4×4, module 2's 8×8×8, the image 1×8×8: E = conv3×3 1→16 and 16→16 at 8×8,
    # R = conv1×1 8→16 at 8×8 (stride 1: the output is at the input's size, then pooled by 2)
    expected = 2 * (1 * 16 * 9 + 16 * 16 * 9) * 64 + 2 * 8 * 16 * 64
    assert cost.flops[2] == expected
    assert cost.parameters[2] == sum(p.numel() for p in encoders(net, 3))
    assert cost.total_parameters == sum(p.numel() for p in net.context.parameters())


def test_errors():
    with pytest.raises(ValueError, match="example_input"):
        llkern.LocalNet(digits_resnet(2, width=8), num_classes=10, context="E")
    with pytest.raises(ValueError, match="mode"):
        llkern.LocalNet(digits_resnet(2, width=8), num_classes=10, context="X", example_input=torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="integer multiple"):
        ContextSupply("E", [torch.Size([2, 1, 8, 8]), torch.Size([2, 4, 3, 3])])
    with pytest.raises(ValueError, match="image-like"):
        ContextSupply("R", [torch.Size([2, 8]), torch.Size([2, 4])])


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_trains_on_digits(mode):
    # K = 4, Adam with a one-cycle schedule, 6 epochs (as the demo, shorter); the fused add is
    # checked against PyTorch above, so the plain path keeps this run short on a CPU
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits(seed=0)
    net = llkern.LocalNet(digits_resnet(4, width=16), num_classes=10, example_input=x_train[:2], context=mode,
                          context_impl="reference")
    epochs, steps = 6, -(-len(y_train) // 64)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * steps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(0, len(y_train), 64):
            idx = order[i:i + 64]
            optimizer.zero_grad()
            net.local_step(x_train[idx], y_train[idx])
            optimizer.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.9, accuracy
