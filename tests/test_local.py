"""LocalNet: gradient isolation, heads and losses, early exit, boundary release, errors."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llkern
from llkern.models import PreActBlock, digits_resnet
from llkern.nn.losses import CrossEntropy, LocalLoss, TransportRegularized, transport_tau


def small_net(**kwargs):
    torch.manual_seed(0)
    blocks = digits_resnet(4, width=8)
    return llkern.LocalNet(blocks, num_classes=10, example_input=torch.randn(2, 1, 8, 8), **kwargs)


def batch(n=16):
    return torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))


def module_params(net, k):
    return list(net.blocks[k].parameters()) + list(net.heads[k].parameters())


def test_no_gradient_crosses_a_boundary():
    net = small_net()
    x, y = batch()
    net.local_step(x, y)
    local_grads = [[p.grad.clone() for p in module_params(net, k)] for k in range(net.num_modules)]
    # Each module alone, on the detached output of the previous one: its own loss only.
    net.zero_grad()
    h = x
    for k in range(net.num_modules):
        out = net.blocks[k](h.detach())
        loss = F.cross_entropy(net.heads[k](out), y)
        grads = torch.autograd.grad(loss, module_params(net, k))
        for g, lg in zip(grads, local_grads[k], strict=True):
            torch.testing.assert_close(lg, g)
        h = out
    # And no module's parameters changed gradient because of a later module's loss: with all
    # later losses scaled by 1000 the earlier modules' gradients are the same.
    net.zero_grad()

    class Scaled(LocalLoss):
        def forward(self, ctx):
            out = CrossEntropy()(ctx)
            out.loss = out.loss * (1000.0 if ctx.k > 0 else 1.0)
            return out

    net.losses = nn.ModuleList([Scaled() for _ in range(net.num_modules)])
    net.local_step(x, y)
    for p, g in zip(module_params(net, 0), local_grads[0], strict=True):
        torch.testing.assert_close(p.grad, g)


def test_step_result_and_accuracy():
    net = small_net()
    x, y = batch(32)
    result = net.local_step(x, y)
    assert len(result.losses) == len(result.accuracies) == len(result.terms) == 4
    logits = net.forward_all(x)  # same weights (no optimizer step), BN in train mode as in the step
    for k in range(4):
        expected = (logits[k].argmax(1) == y).float().mean().item()
        assert result.accuracies[k] == pytest.approx(expected)
        assert result.losses[k] == pytest.approx(F.cross_entropy(logits[k], y).item(), rel=1e-5)
        assert set(result.terms[k]) == {"ce"}


def test_training_reduces_every_local_loss():
    net = small_net()
    x, y = batch(64)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = net.local_step(x, y).losses
    for _ in range(30):
        optimizer.zero_grad()
        last = net.local_step(x, y).losses
        optimizer.step()
    assert all(b < 0.5 * a for a, b in zip(first, last, strict=True))


def test_forward_and_early_exit():
    net = small_net().eval()
    x, _ = batch(5)
    all_logits = net.forward_all(x)
    torch.testing.assert_close(net(x), all_logits[-1])
    for k in range(4):
        torch.testing.assert_close(net(x, exit=k), all_logits[k])
    torch.testing.assert_close(net(x, exit=-2), all_logits[2])
    with pytest.raises(IndexError, match="exit=4"):
        net(x, exit=4)


def test_heads_and_losses_as_lists_factories_and_lazy():
    blocks = digits_resnet(2, width=8)
    shapes = []

    def head_factory(k, shape):
        shapes.append(shape)
        return llkern.LinearHead(10, shape[1])

    net = llkern.LocalNet(blocks, heads=head_factory, losses=lambda k, K: CrossEntropy(label_smoothing=0.1 * k),
                          example_input=torch.randn(2, 1, 8, 8))
    assert shapes == [torch.Size([2, 8, 8, 8]), torch.Size([2, 16, 4, 4])]
    assert [loss.label_smoothing for loss in net.losses] == [0.0, 0.1]
    # Lazy heads: no example input, sized on the first call.
    lazy = llkern.LocalNet(digits_resnet(2, width=8), num_classes=7)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 7, (4,))
    lazy.local_step(x, y)
    assert lazy(x).shape == (4, 7)
    explicit = llkern.LocalNet(digits_resnet(2, width=8), heads=[llkern.LinearHead(3, 8), llkern.LinearHead(3, 16)],
                               losses=[CrossEntropy(), CrossEntropy()])
    assert explicit(x).shape == (4, 3)


def test_construction_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    blocks = digits_resnet(2, width=8)
    before = [b.clone() for b in nn.ModuleList(blocks).buffers()]
    llkern.LocalNet(blocks, heads=lambda k, shape: llkern.LinearHead(10), example_input=torch.randn(4, 1, 8, 8))
    after = list(nn.ModuleList(blocks).buffers())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(blocks=[]), ValueError, "at least one"),
    (dict(blocks=["not a module"], num_classes=3), TypeError, "blocks\\[0\\]"),
    (dict(blocks=[nn.Identity()]), ValueError, "num_classes"),
    (dict(blocks=[nn.Identity(), nn.Identity()], heads=[nn.Identity()]), ValueError, "expected 2 heads"),
    (dict(blocks=[nn.Identity()], heads=nn.Identity()), TypeError, "factory"),
    (dict(blocks=[nn.Identity()], num_classes=3, losses=[CrossEntropy(), CrossEntropy()]), ValueError, "1 losses"),
    (dict(blocks=[nn.Identity()], num_classes=3, losses=[nn.MSELoss()]), TypeError, "LocalLoss"),
])
def test_construction_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        llkern.LocalNet(**kwargs)


def test_local_step_errors():
    net = small_net()
    with pytest.raises(ValueError, match="non-empty batch"):
        net.local_step(torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="target with 4 entries"):
        net.local_step(torch.randn(4, 1, 8, 8), torch.zeros(3, dtype=torch.long))


def test_transport_on_blocks_adds_the_residual_penalties():
    torch.manual_seed(0)
    block = PreActBlock(4, 4)
    net = llkern.LocalNet([nn.Sequential(block, PreActBlock(4, 4))], num_classes=3,
                          losses=TransportRegularized(tau=0.5), example_input=torch.randn(2, 4, 5, 5))
    x, y = torch.randn(6, 4, 5, 5), torch.randint(0, 3, (6,))
    result = net.local_step(x, y)
    with torch.no_grad():
        h1, r1 = net.blocks[0][0].forward_residual(x)
        h2, r2 = net.blocks[0][1].forward_residual(h1)
        penalty = (r1.square().mean() + r2.square().mean()) / (2 * 0.5)
        ce = F.cross_entropy(net.heads[0](h2), y)
    assert result.terms[0]["transport"] == pytest.approx(penalty.item(), rel=1e-5)
    assert result.losses[0] == pytest.approx((ce + penalty).item(), rel=1e-5)


def test_transport_on_module_and_its_shape_error():
    torch.manual_seed(0)
    net = llkern.LocalNet([PreActBlock(4, 4)], num_classes=3, losses=TransportRegularized(tau=2.0, on="module"),
                          example_input=torch.randn(2, 4, 5, 5))
    x, y = torch.randn(6, 4, 5, 5), torch.randint(0, 3, (6,))
    result = net.local_step(x, y)
    with torch.no_grad():
        expected = (net.blocks[0](x) - x).square().mean() / (2 * 2.0)
    assert result.terms[0]["transport"] == pytest.approx(expected.item(), rel=1e-5)
    shape_changing = llkern.LocalNet([PreActBlock(4, 8, stride=2)], num_classes=3,
                                     losses=TransportRegularized(on="module"))
    with pytest.raises(ValueError, match="changes the shape"):
        shape_changing.local_step(x, y)


def test_transport_without_residual_blocks_warns():
    net = llkern.LocalNet([nn.Sequential(nn.Flatten(), nn.Linear(8, 8))], num_classes=3,
                          losses=TransportRegularized())
    with pytest.warns(UserWarning, match="no block defining forward_residual"):
        result = net.local_step(torch.randn(4, 8), torch.randint(0, 3, (4,)))
    assert result.terms[0]["transport"] == 0.0


def test_tau_schedule():
    assert [transport_tau(k, 4, 1.0, "varying") for k in range(4)] == [0.5, 0.5, 1.0, 1.0]
    assert [transport_tau(k, 5, 2.0, "varying") for k in range(5)] == [1.0, 1.0, 2.0, 2.0, 2.0]
    assert [transport_tau(k, 3, 2.0) for k in range(3)] == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="tau_schedule"):
        transport_tau(0, 2, 1.0, "linear")
    with pytest.raises(ValueError, match="tau_schedule"):
        TransportRegularized(tau_schedule="linear")
    with pytest.raises(ValueError, match="on"):
        TransportRegularized(on="layers")


def test_boundaries_are_released_after_the_next_backward():
    net = small_net()
    alive_when_called = {}
    inputs = {}

    class Probe(LocalLoss):
        def forward(self, ctx):
            inputs[ctx.k] = weakref.ref(ctx.inputs)
            # While module k runs its own input is alive and module k-1's input is already gone.
            alive_when_called[ctx.k] = {j: ref() is not None for j, ref in inputs.items()}
            return CrossEntropy()(ctx)

    net.losses = nn.ModuleList([Probe() for _ in range(4)])
    x, y = batch()
    result = net.local_step(x, y)
    gc.collect()
    for k in range(1, 4):
        assert alive_when_called[k][k]
        assert not any(alive_when_called[k][j] for j in range(k)), f"an earlier boundary is alive during module {k}"
    assert all(ref() is None for ref in inputs.values())
    assert all(b.released for b in result.boundaries)
    with pytest.raises(RuntimeError, match="released"):
        _ = result.boundaries[1].tensor


def test_keep_boundaries():
    net = small_net()
    x, y = batch()
    result = net.local_step(x, y, keep_boundaries=True)
    assert [b.released for b in result.boundaries] == [False] * 4
    h = x
    with torch.no_grad():
        for k in range(4):
            h = net.blocks[k](h)
            assert not result.boundaries[k].tensor.requires_grad
            assert result.boundaries[k].tensor.shape == h.shape


@pytest.mark.parametrize("context", [None, pytest.param("R", marks=pytest.mark.slow)])
def test_predict_with_confidence_exit(context):
    torch.manual_seed(0)
    x, y = batch(24)
    net = llkern.LocalNet(digits_resnet(3, width=8), num_classes=10, example_input=x[:2], context=context)
    for _ in range(3):  # heads that disagree in confidence
        net.local_step(x, y)
        with torch.no_grad():
            for p in net.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
                    p.grad = None
    net.eval()
    with torch.no_grad():
        every = net.forward_all(x)
    logits, exits = net.predict(x)
    torch.testing.assert_close(logits, every[-1])
    assert (exits == 2).all()
    logits, exits = net.predict(x, threshold=1e-6)  # every sample leaves at head 0
    torch.testing.assert_close(logits, every[0])
    assert (exits == 0).all()
    confidence = torch.stack([e.softmax(1).amax(1) for e in every[:-1]])
    threshold = float(confidence[0].median())
    logits, exits = net.predict(x, threshold=threshold)
    for i in range(len(x)):  # each sample's logits are its exit head's, and no earlier head was confident
        k = int(exits[i])
        torch.testing.assert_close(logits[i], every[k][i])
        assert all(confidence[j, i] < threshold for j in range(k))
        assert k == 2 or confidence[k, i] >= threshold
    assert 0 < int((exits == 0).sum()) < len(x)
    with pytest.raises(ValueError, match="threshold"):
        net.predict(x, threshold=1.5)


@pytest.mark.parametrize("context", [None, "RE"])
def test_export_and_save_load(tmp_path, context):
    torch.manual_seed(0)
    x, y = batch(8)
    # losses with decoders built from a factory: LocalNet.save must pickle them too
    net = llkern.LocalNet(digits_resnet(3, width=8), num_classes=10, example_input=x[:2], context=context,
                          losses=lambda k, K: llkern.Composite([
                              (llkern.Reconstruction(llkern.reconstruction_decoders(x.shape[1:])), 1.0),
                              (llkern.CrossEntropy(), 1.0)]))
    net.local_step(x, y)
    net.eval()
    for k in (0, 1, -1):
        exported = net.export(k).eval()
        torch.testing.assert_close(exported(x), net(x, exit=k))
        used = {id(p) for p in exported.parameters()}
        assert not any(id(p) in used for p in net.heads[(k + 1) % 3 if k != -1 else 0].parameters())
    assert isinstance(net.export(), nn.Sequential) == (context is None)
    with pytest.raises(IndexError, match="exit"):
        net.export(3)
    net.save(tmp_path / "net.pt")
    loaded = llkern.LocalNet.load(tmp_path / "net.pt").eval()
    torch.testing.assert_close(loaded(x), net(x))
    assert loaded.num_modules == 3 and (loaded.context is None) == (context is None)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a LocalNet"):
        llkern.LocalNet.load(tmp_path / "other.pt")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_default_heads_and_context_encoders_take_the_blocks_dtype(dtype):
    # (float32 heads on a float64 or bfloat16 model's features: the fused head refused the dtypes)
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())]
    blocks = [b.to(dtype) for b in blocks]
    x, y = torch.randn(8, 1, 8, 8, dtype=dtype), torch.randint(0, 10, (8,))
    net = llkern.LocalNet(blocks, num_classes=10, example_input=x[:2], context="E")
    assert {p.dtype for p in [*net.heads.parameters(), *net.context.parameters()]} == {dtype}
    result = net.local_step(x, y)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses)
    assert all(p.grad is not None and p.grad.dtype == dtype for p in net.heads.parameters())
    # heads given by the caller are used as they are
    mine = [llkern.nn.LinearHead(10, 4), llkern.nn.LinearHead(10, 6)]
    net = llkern.LocalNet([b for b in blocks], heads=mine, example_input=x[:2])
    assert all(p.dtype == torch.float32 for p in net.heads.parameters())
