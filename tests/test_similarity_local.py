"""Local losses built on the similarity ops (issue 4): SupervisedContrastive (InfoPro) and
MutualInformation (MOLE), the projection head, and their use in LocalNet."""

import math
import time

import pytest
import torch
from torch import nn

import llkern
from llkern.data.images import load_digits
from llkern.models import digits_resnet
from llkern.nn.heads import LinearHead, ProjectionHead, contrastive_heads
from llkern.nn.losses import CrossEntropy, LocalContext, LocalLoss, MutualInformation, SupervisedContrastive
from llkern.ops.similarity import renyi_mutual_information, supcon_loss

pytestmark = pytest.mark.filterwarnings("ignore:llkern.*using the pure-PyTorch reference:UserWarning")


def context(k=0, num_modules=2, head=None, n=24, shape=(8, 4, 4), classes=4, requires_grad=True):
    outputs = torch.randn(n, *shape, requires_grad=requires_grad)
    target = torch.randint(0, classes, (n,))
    head = head if head is not None else ProjectionHead(16, shape[0], hidden=32)
    return LocalContext(k, num_modules, torch.randn(n, 1, 8, 8), outputs, target, head)


def rms_width(t, scale=0.5):
    """σ of sigma="rms", from its definition: scale × the root of the mean squared distance between two rows."""
    t = t.detach().double()
    n = t.shape[0]
    squared = torch.cdist(t, t).square().sum() / (n * (n - 1))
    return scale * math.sqrt(squared.item())


# --- ProjectionHead and the head factory -------------------------------------------------------------------------

def test_projection_head_shapes_and_lazy():
    head = ProjectionHead(out_dim=12, in_channels=6, hidden=20)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert head.mlp[0].in_features == 6 and head.mlp[0].out_features == 20 and head.mlp[2].out_features == 12
    x = torch.randn(5, 6, 3, 3)
    torch.testing.assert_close(head(x), head(x.mean(dim=(2, 3))))  # mean-pool over H, W
    assert head(torch.randn(5, 6)).shape == (5, 12)
    assert head(torch.randn(5, 7, 6)).shape == (5, 7, 12)
    lazy = ProjectionHead()
    assert lazy(torch.randn(3, 9, 2, 2)).shape == (3, 128)
    assert lazy.mlp[0].in_features == 9 and lazy.hidden == 128
    with pytest.raises(ValueError, match=r"shape \(B,C\)"):
        head(torch.randn(2, 6, 3, 3, 1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(out_dim=0), "out_dim"), (dict(hidden=-1), "hidden"), (dict(in_channels=0), "in_channels"),
    (dict(out_dim=2.5), "out_dim"),
])
def test_projection_head_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProjectionHead(**kwargs)


def test_contrastive_heads_factory():
    factory = contrastive_heads(10, 3, out_dim=32, hidden=16)
    heads = [factory(k, torch.Size([2, 8, 4, 4])) for k in range(3)]
    assert [type(h) for h in heads] == [ProjectionHead, ProjectionHead, LinearHead]
    assert heads[0].mlp[0].in_features == 8 and heads[0].out_dim == 32 and heads[0].hidden == 16
    assert heads[2].num_classes == 10 and heads[2].fc.in_features == 8
    assert isinstance(factory(2, None).fc, nn.LazyLinear)
    with pytest.raises(ValueError, match="num_modules"):
        contrastive_heads(10, 0)


# --- the losses against the ops ----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,normalize", [(0.07, True), (0.5, True), (0.2, False)])
def test_supervised_contrastive_matches_the_op(temperature, normalize):
    ctx = context()
    result = SupervisedContrastive(temperature, normalize=normalize)(ctx)
    expected = supcon_loss(ctx.head(ctx.outputs), ctx.target, temperature, normalize=normalize)
    torch.testing.assert_close(result.loss, expected)
    assert result.logits is None and result.correct is None
    assert set(result.terms) == {"supcon"}
    torch.testing.assert_close(result.terms["supcon"], expected.detach())
    assert not result.terms["supcon"].requires_grad
    # Gradients reach the module's output and its head.
    result.loss.backward()
    assert ctx.outputs.grad is not None and ctx.head.mlp[0].weight.grad is not None


def test_supervised_contrastive_per_token():
    ctx = context(shape=(5, 6), head=ProjectionHead(16, 6, hidden=32))  # (B,T,C) tokens, one label per token
    ctx.target = torch.randint(0, 3, (24, 5))
    result = SupervisedContrastive()(ctx)
    z = ctx.head(ctx.outputs)
    torch.testing.assert_close(result.loss, supcon_loss(z.reshape(-1, 16), ctx.target.reshape(-1)))


@pytest.mark.parametrize("pool", [False, True])
def test_mutual_information_rms_width_matches_the_op(pool):
    ctx = context(classes=3)
    loss = MutualInformation(pool=pool, sigma_scale=0.7)
    result = loss(ctx)
    t = ctx.outputs.mean(dim=(2, 3)) if pool else ctx.outputs.flatten(1)
    expected = renyi_mutual_information(t, ctx.target, sigma=rms_width(t, 0.7))
    torch.testing.assert_close(result.loss, -expected, rtol=1e-5, atol=1e-6)
    assert set(result.terms) == {"mi"} and result.terms["mi"].item() > 0
    torch.testing.assert_close(result.terms["mi"], expected.detach(), rtol=1e-5, atol=1e-6)
    assert result.logits is None and result.correct is None


def test_mutual_information_fixed_and_silverman_widths_match_the_op():
    ctx = context(classes=3)
    t = ctx.outputs.flatten(1)
    for loss, kwargs in [(MutualInformation(sigma=6.0), dict(sigma=6.0)),
                         (MutualInformation(sigma=6.0, label_sigma=0.8), dict(sigma=6.0, label_sigma=0.8)),
                         (MutualInformation(sigma="silverman"), {})]:
        torch.testing.assert_close(loss(ctx).loss, -renyi_mutual_information(t, ctx.target, **kwargs))


def test_mutual_information_rms_width_is_differentiated_through():
    """With σ ∝ the batch's spread, I(cT; Y) = I(T; Y): the objective is scale invariant, so its
    gradient is orthogonal to T (a module cannot raise I by scaling its output)."""
    ctx = context(classes=3, shape=(16,), head=nn.Identity())
    loss = MutualInformation()
    value = loss(ctx).loss
    scaled = LocalContext(0, 2, ctx.inputs, 3.0 * ctx.outputs.detach(), ctx.target, ctx.head)
    torch.testing.assert_close(loss(scaled).loss, value, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(value, ctx.outputs)
    assert grad.abs().max() > 0
    assert abs((grad * ctx.outputs).sum().item()) < 1e-4 * grad.norm().item() * ctx.outputs.norm().item()
    # A fixed width is not scale invariant: the gradient has a radial part.
    (fixed,) = torch.autograd.grad(MutualInformation(sigma=4.0)(ctx).loss, ctx.outputs)
    assert abs((fixed * ctx.outputs).sum().item()) > 1e-2 * fixed.norm().item() * ctx.outputs.norm().item()


def test_mutual_information_degenerate_batches():
    one = context(n=1)
    assert MutualInformation()(one).loss.item() == 0.0
    same = context(n=6, requires_grad=False)
    same.outputs = torch.ones(6, 8, 4, 4)  # no spread: I = 0 at any width, and finite
    assert MutualInformation()(same).loss.item() == pytest.approx(0.0, abs=1e-6)


# --- the last-module rule ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [SupervisedContrastive, MutualInformation])
def test_last_module_is_trained_by_the_task_loss(make):
    head = LinearHead(4, 8)
    last = context(k=2, num_modules=3, head=head)
    result = make()(last)
    expected = CrossEntropy()(last)
    torch.testing.assert_close(result.loss, expected.loss)
    assert set(result.terms) == {"ce"} and result.correct is not None
    # Not the last module: the representation objective.
    early = make()(context(k=1, num_modules=3))
    assert set(early.terms) == ({"supcon"} if make is SupervisedContrastive else {"mi"})
    # A single module is the last one.
    assert set(make()(context(k=0, num_modules=1, head=head)).terms) == {"ce"}
    # A custom task loss, or none.
    smoothed = make(last_module_task=CrossEntropy(label_smoothing=0.2))(last)
    torch.testing.assert_close(smoothed.loss, CrossEntropy(label_smoothing=0.2)(last).loss)
    none = make(last_module_task=False)
    assert none.task is None and not none.uses_task(2, 3)
    if make is MutualInformation:
        assert set(none(last).terms) == {"mi"}


def test_last_module_with_a_projection_head_is_an_error():
    with pytest.raises(ValueError, match="ProjectionHead"):
        SupervisedContrastive()(context(k=1, num_modules=2))


# --- parameters --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,error,match", [
    (lambda: SupervisedContrastive(0.0), ValueError, "temperature"),
    (lambda: SupervisedContrastive(-0.1), ValueError, "temperature"),
    (lambda: SupervisedContrastive(float("nan")), ValueError, "temperature"),
    (lambda: SupervisedContrastive(float("inf")), ValueError, "temperature"),
    (lambda: SupervisedContrastive("0.1"), TypeError, "temperature"),
    (lambda: SupervisedContrastive(True), TypeError, "temperature"),
    (lambda: SupervisedContrastive(last_module_task="ce"), TypeError, "last_module_task"),
    (lambda: SupervisedContrastive(last_module_task=nn.CrossEntropyLoss()), TypeError, "last_module_task"),
    (lambda: MutualInformation(sigma="median"), ValueError, "sigma"),
    (lambda: MutualInformation(sigma=0.0), ValueError, "sigma"),
    (lambda: MutualInformation(sigma=-1), ValueError, "sigma"),
    (lambda: MutualInformation(sigma=None), TypeError, "sigma"),
    (lambda: MutualInformation(sigma_scale=0), ValueError, "sigma_scale"),
    (lambda: MutualInformation(label_sigma=0.0), ValueError, "label_sigma"),
    (lambda: MutualInformation(label_sigma="1"), TypeError, "label_sigma"),
    (lambda: MutualInformation(last_module_task=None), TypeError, "last_module_task"),
])
def test_bad_parameters(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --- in LocalNet -------------------------------------------------------------------------------------------------

def contrastive_net():
    torch.manual_seed(0)
    return llkern.LocalNet(digits_resnet(3, width=8), heads=contrastive_heads(10, 3, out_dim=16, hidden=16),
                           losses=SupervisedContrastive(), example_input=torch.randn(2, 1, 8, 8))


def mi_net():
    torch.manual_seed(0)
    return llkern.LocalNet(digits_resnet(3, width=8), num_classes=10, losses=MutualInformation(),
                           example_input=torch.randn(2, 1, 8, 8))


def batch(n=32):
    return torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))


@pytest.mark.parametrize("make_net,term", [(contrastive_net, "supcon"), (mi_net, "mi")])
def test_local_step(make_net, term):
    net = make_net()
    x, y = batch()
    result = net.local_step(x, y)
    assert [set(t) for t in result.terms] == [{term}, {term}, {"ce"}]
    assert result.accuracies[:2] == [None, None] and 0.0 <= result.accuracies[2] <= 1.0
    if term == "mi":
        assert all(loss == pytest.approx(-t["mi"]) for loss, t in zip(result.losses[:2], result.terms[:2], strict=True))
    net.eval()
    assert net(x).shape == (32, 10)
    assert net(x, exit=0).shape == ((32, 16) if term == "supcon" else (32, 10))


@pytest.mark.parametrize("make_net", [contrastive_net, mi_net])
def test_no_gradient_crosses_a_boundary(make_net):
    net = make_net()
    x, y = batch()
    net.local_step(x, y)
    params = [list(net.blocks[k].parameters()) + list(net.heads[k].parameters()) for k in range(net.num_modules)]
    local_grads = [[None if p.grad is None else p.grad.clone() for p in ps] for ps in params]
    # Each module alone, on the detached output of the previous one: its own loss only.
    net.zero_grad()
    h = x
    for k in range(net.num_modules):
        out = net.blocks[k](h.detach())
        loss = net.losses[k](LocalContext(k, net.num_modules, h.detach(), out, y, net.heads[k])).loss
        grads = torch.autograd.grad(loss, params[k], allow_unused=True)
        for g, lg in zip(grads, local_grads[k], strict=True):
            if g is None:  # a head the loss does not use (MutualInformation on modules 0..K-2)
                assert lg is None
            else:
                torch.testing.assert_close(lg, g)
        h = out
    # Later losses scaled by 1000: the earlier modules' gradients do not change.
    net.zero_grad()
    inner = net.losses[0]

    class Scaled(LocalLoss):
        def forward(self, ctx):
            out = inner(ctx)
            out.loss = out.loss * (1000.0 if ctx.k > 0 else 1.0)
            return out

    net.losses = nn.ModuleList([Scaled() for _ in range(net.num_modules)])
    net.local_step(x, y)
    for p, g in zip(params[0], local_grads[0], strict=True):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g)


# --- acceptance: digits, K = 2, each new loss plus the last module's cross-entropy -------------------------------

@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def module0_objective(net, x, y):
    """Module 0's local loss on held-out data (eval mode)."""
    was_training = net.training
    net.eval()
    out = net.blocks[0](x)
    value = net.losses[0](LocalContext(0, net.num_modules, x, out, y, net.heads[0])).loss.item()
    net.train(was_training)
    return value


def train_on_digits(losses, heads=None, *, width=16, epochs=6, lr=2e-3, batch_size=64, seed=0):
    """K = 2, Adam with a one-cycle schedule (as the demo). Returns the test accuracy of ``net(x)`` (the last
    head), module 0's local loss on the test set before and after training, and the training time."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed=seed)
    net = llkern.LocalNet(digits_resnet(2, width=width), num_classes=10, heads=heads, losses=losses,
                          example_input=x_train[:2])
    before = module0_objective(net, x_test, y_test)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps = -(-len(y_train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(0, len(y_train), batch_size):
            idx = order[i:i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            net.local_step(x_train[idx], y_train[idx])
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(dim=1) == y_test).float().mean().item()
    return accuracy, before, module0_objective(net, x_test, y_test), seconds


@pytest.mark.slow
@pytest.mark.usefixtures("two_threads")
def test_digits_supervised_contrastive_reaches_90_percent():
    accuracy, before, after, seconds = train_on_digits(SupervisedContrastive(temperature=0.07),
                                                       contrastive_heads(10, 2))
    print(f"SupervisedContrastive: test accuracy {accuracy:.4f}, {seconds:.1f} s; "
          f"module 0 supcon on the test set {before:.3f} -> {after:.3f}")
    assert accuracy >= 0.90, f"test accuracy {accuracy:.4f}"
    # Module 0 learnt from its own contrastive loss: lower on the test set than at initialisation.
    assert after < before


@pytest.mark.slow
@pytest.mark.usefixtures("two_threads")
def test_digits_mutual_information_reaches_90_percent():
    accuracy, before, after, seconds = train_on_digits(MutualInformation())
    print(f"MutualInformation: test accuracy {accuracy:.4f}, {seconds:.1f} s; "
          f"module 0 I(T; Y) on the test set {-before:.3f} -> {-after:.3f} bits")
    assert accuracy >= 0.90, f"test accuracy {accuracy:.4f}"
    # Module 0 learnt from its own objective: more information about the labels on the test set.
    assert after < before


def test_exports():
    for name in ("SupervisedContrastive", "MutualInformation", "ProjectionHead", "contrastive_heads"):
        assert name in llkern.__all__ and hasattr(llkern, name)
