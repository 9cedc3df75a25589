"""Heads of the published methods (DGL's MLP-SR, InfoPro's conv head and decoder, a token head) and composed
local losses (Reconstruction, Composite, per-module schedules) — issue 6."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llkern
from llkern.data.images import load_digits
from llkern.models import digits_resnet, transformer_encoder
from llkern.nn.heads import (
    InfoProHead,
    LinearHead,
    MLPSRHead,
    ReconstructionDecoder,
    TokenHead,
    feature_shapes,
    infopro_heads,
    mlp_sr_heads,
    reconstruction_decoders,
    token_heads,
)
from llkern.nn.losses import (
    INFOPRO_WEIGHTS,
    Composite,
    CrossEntropy,
    LinearSchedule,
    LocalContext,
    LocalLoss,
    LocalLossOutput,
    MutualInformation,
    Reconstruction,
    SupervisedContrastive,
    TransportRegularized,
    infopro_schedule,
)
from llkern.ops.transport import transport_penalty

pytestmark = pytest.mark.filterwarnings("ignore:llkern.*using the pure-PyTorch reference:UserWarning")

IMAGE_SIZES = [(5, 3), (1, 1)]


# --- head shapes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", IMAGE_SIZES)
def test_mlp_sr_head_shapes_and_layout(hw):
    head = MLPSRHead(5, 7)
    x = torch.randn(4, 7, *hw)
    assert head(x).shape == (4, 5)
    assert [type(m) for m in head.convs] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    assert all(m.kernel_size == (1, 1) for m in head.convs if isinstance(m, nn.Conv2d))
    assert [m.in_features for m in head.mlp if isinstance(m, nn.Linear)] == [28, 28, 28, 28]  # 7 channels × 2×2
    # The documented computation: pool to ⌈H/4⌉×⌈W/4⌉, 1×1 convs, pool to 2×2, MLP.
    reduced = F.adaptive_avg_pool2d(x, (math.ceil(hw[0] / 4), math.ceil(hw[1] / 4)))
    expected = head.mlp(F.adaptive_avg_pool2d(head.convs(reduced), 2).flatten(1))
    torch.testing.assert_close(head(x), expected)
    head.eval()
    torch.testing.assert_close(head(x.transpose(2, 3).contiguous().transpose(2, 3)), head(x))  # non-contiguous
    small = MLPSRHead(3, 7, conv_layers=1, mlp_layers=0, pool_size=1, width=4)
    assert small(x).shape == (4, 3) and small.mlp[0].in_features == 4


@pytest.mark.parametrize("hw", IMAGE_SIZES)
def test_infopro_head_shapes_and_layout(hw):
    head = InfoProHead(5, 7)
    assert head(torch.randn(4, 7, *hw)).shape == (4, 5)
    conv, linears = head.head[0], [m for m in head.head if isinstance(m, nn.Linear)]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (7, 14, (3, 3), (2, 2))
    assert [(m.in_features, m.out_features) for m in linears] == [(14, 128), (128, 5)]
    # InfoPro's widths on its ResNets' stages: 16 → 32 and 32 → 64 with stride 2, 64 → 64 with stride 1.
    for c, width, stride in [(16, 32, 2), (32, 64, 2), (64, 64, 1)]:
        conv = InfoProHead(10, c).head[0]
        assert (conv.out_channels, conv.stride) == (width, (stride, stride))
    custom = InfoProHead(128, 7, conv_channels=9, stride=1, hidden=32)
    assert custom(torch.randn(2, 7, *hw)).shape == (2, 128) and custom.head[0].out_channels == 9


@pytest.mark.parametrize("hw", IMAGE_SIZES)
def test_reconstruction_decoder_shapes(hw):
    decoder = ReconstructionDecoder(7, (3, 8, 6))
    assert decoder(torch.randn(4, 7, *hw)).shape == (4, 3, 8, 6)
    assert ReconstructionDecoder(7, torch.Size([2, 1, 9, 9]), hidden=5, mode="nearest")(
        torch.randn(4, 7, *hw)).shape == (4, 1, 9, 9)
    # The documented computation: bilinear upsampling (align_corners=True), then the conv stack.
    x = torch.randn(4, 7, *hw)
    expected = decoder.decoder(F.interpolate(x, size=(8, 6), mode="bilinear", align_corners=True))
    torch.testing.assert_close(decoder(x), expected)


@pytest.mark.parametrize("pool", [False, True])
def test_token_head_shapes_and_fused_loss(pool):
    head = TokenHead(5, 7, pool=pool)
    tokens = torch.randn(3, 97, 7)
    logits = head(tokens)
    assert logits.shape == ((3, 5) if pool else (3, 97, 5))
    torch.testing.assert_close(logits, head.classifier.fc(F.layer_norm(tokens, (7,)).mean(1) if pool
                                                          else F.layer_norm(tokens, (7,))))
    target = torch.randint(0, 5, (3,) if pool else (3, 97))
    loss, correct = head.loss(tokens, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 5), target.reshape(-1)))
    assert correct.item() == (logits.argmax(-1) == target).sum().item()
    # CrossEntropy takes the fused path (no logits, counts instead).
    out = CrossEntropy()(LocalContext(0, 1, tokens, tokens, target, head))
    assert out.logits is None and out.correct.item() == correct.item()
    with pytest.raises(ValueError, match=r"\(B,T,C\)"):
        head(torch.randn(3, 7))


def test_head_factories():
    shape = torch.Size([2, 7, 5, 3])
    assert isinstance(mlp_sr_heads(10)(0, shape), MLPSRHead)
    heads = [infopro_heads(10, 3)(k, shape) for k in range(3)]
    assert [type(h) for h in heads] == [InfoProHead, InfoProHead, LinearHead]
    assert heads[0].num_classes == 10 and heads[2].fc.in_features == 7
    contrastive = infopro_heads(10, 2, out_dim=128, last_linear=False)
    assert contrastive(0, shape).num_classes == 128 and isinstance(contrastive(1, shape), InfoProHead)
    assert contrastive(1, shape).num_classes == 10
    decoder = reconstruction_decoders((1, 8, 8))(1, shape)
    assert decoder(torch.randn(2, 7, 5, 3)).shape == (2, 1, 8, 8)
    token = token_heads(10, pool=True)(0, torch.Size([2, 97, 7]))
    assert isinstance(token, TokenHead) and token.pool and token.norm.normalized_shape == (7,)
    for factory in (mlp_sr_heads(10), infopro_heads(10, 2), reconstruction_decoders((1, 8, 8)), token_heads(10)):
        with pytest.raises(ValueError, match="example_input"):
            factory(0, None)
    with pytest.raises(ValueError, match=r"\(B,C,H,W\)"):
        mlp_sr_heads(10)(0, torch.Size([2, 97, 7]))
    with pytest.raises(ValueError, match=r"\(B,T,C\)"):
        token_heads(10)(0, shape)


@pytest.mark.parametrize("make,match", [
    (lambda: MLPSRHead(0, 7), "num_classes"),
    (lambda: MLPSRHead(5, 7, reduce=0), "reduce"),
    (lambda: MLPSRHead(5, 7, conv_layers=-1), "conv_layers"),
    (lambda: InfoProHead(5, 7, hidden=0), "hidden"),
    (lambda: InfoProHead(5, 7.0), "in_channels"),
    (lambda: ReconstructionDecoder(7, (8, 8)), "image_shape"),
    (lambda: ReconstructionDecoder(7, (1, 8, 8), mode="bicubic"), "mode"),
    (lambda: reconstruction_decoders((1, 0, 8)), "image_shape"),
    (lambda: TokenHead(5, 0), "in_channels"),
    (lambda: infopro_heads(10, 0), "num_modules"),
])
def test_head_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_feature_shapes_match_localnet_and_restore_modes():
    blocks = digits_resnet(2, width=8)
    blocks[1].eval()
    shapes = feature_shapes(blocks, torch.randn(2, 1, 8, 8))
    assert shapes == [torch.Size([2, 8, 8, 8]), torch.Size([2, 16, 4, 4])]
    assert blocks[0].training and not blocks[1].training


# --- each head trains in a LocalNet on digits --------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    x, y, _, _ = load_digits()
    return x[:128], y[:128]


class WithImage(LocalLoss):
    """Passes the network's input as ``ctx.image`` (what LocalNet does), for losses called outside it."""

    def __init__(self, inner, batch):
        super().__init__()
        self.inner, self.batch = inner, batch

    def forward(self, ctx):
        return self.inner(dataclasses.replace(ctx, image=self.batch["x"]))


def train(net, x, y, steps=12, lr=5e-3):
    """Losses of the first step and the mean of the last three, per module (a fixed batch, Adam)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        history.append(net.local_step(x, y))
        optimizer.step()
    first = history[0].losses
    last = [sum(r.losses[k] for r in history[-3:]) / 3 for k in range(net.num_modules)]
    return first, last, history


@pytest.mark.parametrize("heads,losses", [
    (mlp_sr_heads(10), CrossEntropy()),
    (infopro_heads(10, 2), CrossEntropy()),
    (infopro_heads(10, 2, out_dim=32), SupervisedContrastive()),
], ids=["mlp-sr", "infopro-ce", "infopro-supcon"])
def test_image_heads_train_in_localnet(digits, heads, losses):
    x, y = digits
    torch.manual_seed(0)
    net = llkern.LocalNet(digits_resnet(2, width=8), heads=heads, losses=losses, example_input=x[:2])
    first, last, _ = train(net, x, y)
    assert all(b < 0.8 * a for a, b in zip(first, last, strict=True)), (first, last)


@pytest.mark.parametrize("pool", [True, False])
def test_token_head_trains_in_localnet(digits, pool):
    x, y = digits
    torch.manual_seed(0)
    encoder = transformer_encoder(dim=16, depth=2, num_heads=2)
    blocks = [nn.Sequential(encoder.embed, encoder.block_0), nn.Sequential(encoder.block_1)]
    net = llkern.LocalNet(blocks, heads=token_heads(10, pool=pool), example_input=x[:2])
    target = y if pool else y[:, None].expand(-1, 16)  # per token: every patch carries its image's label
    first, last, history = train(net, x, target, steps=30, lr=1e-2)
    assert all(b < 0.8 * a for a, b in zip(first, last, strict=True)), (first, last)
    assert all(a is not None for a in history[-1].accuracies)


def test_decoders_train_with_reconstruction_in_localnet(digits):
    x, y = digits
    torch.manual_seed(0)
    blocks = digits_resnet(2, width=8)
    shapes = feature_shapes(blocks, x[:2])
    make_decoder = reconstruction_decoders(x.shape)
    recon_weight, task_weight = infopro_schedule(first=(1.0, 0.5), last=(1.0, 0.5), final=(1.0, 1.0))
    batch = {}
    losses = [WithImage(Composite([(Reconstruction(make_decoder(k, shapes[k])), recon_weight),
                                   (CrossEntropy(), task_weight)]), batch) for k in range(2)]
    net = llkern.LocalNet(blocks, num_classes=10, losses=losses, example_input=x[:2])
    batch["x"] = x
    _, _, history = train(net, x, y, steps=15, lr=1e-2)
    for k in range(2):
        recon = [r.terms[k]["recon"] for r in history]
        assert sum(recon[-3:]) / 3 < 0.8 * recon[0], (k, recon)
        assert set(history[0].terms[k]) == {"recon", "ce"} and history[0].accuracies[k] is not None


def test_reconstruction_of_module_0_in_localnet_needs_no_image(digits):
    """Module 0 reconstructs the image; InfoPro's schedule switches reconstruction off on the last module (K = 2)."""
    x, y = digits
    torch.manual_seed(0)
    blocks = digits_resnet(2, width=8)
    recon, task = infopro_schedule(*INFOPRO_WEIGHTS["resnet32", 2])
    decoders = reconstruction_decoders(x.shape)
    loss = Composite([(Reconstruction(decoders, feature_shapes=feature_shapes(blocks, x[:2])), recon),
                      (SupervisedContrastive(), task)])
    net = llkern.LocalNet(blocks, heads=infopro_heads(10, 2, out_dim=32), losses=loss, example_input=x[:2])
    result = net.local_step(x, y)
    assert set(result.terms[0]) == {"recon", "supcon"} and set(result.terms[1]) == {"ce"}
    assert all(p.grad is not None for p in loss.terms[0].decoders[0].parameters())
    assert all(p.grad is None for p in loss.terms[0].decoders[1].parameters())  # λ1 = 0: never called


# --- Composite ---------------------------------------------------------------------------------------------------

def all_terms_context(k=0, num_modules=2, n=24, classes=4):
    """Module k's context where all five losses apply: image features with residual branches, a head whose
    outputs serve as logits and projections, the image."""
    torch.manual_seed(1)
    outputs = torch.randn(n, 6, 3, 5, requires_grad=True)
    residuals = [0.5 * outputs, outputs.tanh()]
    target = torch.randint(0, classes, (n,))
    image = torch.randn(n, 1, 8, 8)
    return LocalContext(k, num_modules, image, outputs, target, LinearHead(classes, 6), residuals, image=image)


def five_terms():
    torch.manual_seed(2)
    return [
        (CrossEntropy(), 0.5),
        (SupervisedContrastive(temperature=0.2), LinearSchedule(2.0, 0.0)),
        (Reconstruction(ReconstructionDecoder(6, (1, 8, 8))), 3.0),
        (TransportRegularized(task=False, tau=0.5), 0.25),
        (MutualInformation(), 0.1),
    ]


def test_composite_is_the_weighted_sum_of_its_terms_value_and_gradient():
    ctx = all_terms_context()
    terms = five_terms()
    composite = Composite(terms)
    weights = [w if isinstance(w, float) else w(ctx.k, ctx.num_modules) for _, w in terms]
    assert weights == [0.5, 2.0, 3.0, 0.25, 0.1] and composite.weights(0, 2) == weights
    params = [ctx.outputs, *ctx.head.parameters(), *composite.parameters()]
    result = composite(ctx)
    grads = torch.autograd.grad(result.loss, params, allow_unused=True, retain_graph=True)
    expected_loss, expected_grads, expected_terms = 0.0, [torch.zeros_like(p) for p in params], {}
    for (term, _), w in zip(terms, weights, strict=True):
        out = term(ctx)
        expected_loss = expected_loss + w * out.loss.item()
        expected_terms.update(out.terms)
        for acc, g in zip(expected_grads, torch.autograd.grad(out.loss, params, allow_unused=True,
                                                              retain_graph=True), strict=True):
            if g is not None:
                acc += w * g
    assert result.loss.item() == pytest.approx(expected_loss, rel=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(torch.zeros_like(e) if g is None else g, e, rtol=1e-4, atol=1e-6)
    assert set(result.terms) == {"ce", "supcon", "recon", "transport", "mi"}
    for name, value in expected_terms.items():
        torch.testing.assert_close(result.terms[name], value.detach(), rtol=1e-5, atol=1e-6)
        assert not result.terms[name].requires_grad
    # Hand-computed pieces: the penalty and the reconstruction.
    penalty = sum(transport_penalty(r, None, 0.5) for r in ctx.residuals)
    torch.testing.assert_close(result.terms["transport"], penalty.detach())
    torch.testing.assert_close(result.terms["recon"],
                               F.mse_loss(composite.terms[2].decoders[0](ctx.outputs), ctx.image).detach())
    # The fused CE head gives the accuracy counts.
    assert result.correct is not None and result.counted.item() == 24


def test_composite_schedule_switches_terms_off_and_reports_accuracy_of_the_first():
    class Fails(LocalLoss):
        def forward(self, ctx):
            raise AssertionError("a term with weight 0 must not be evaluated")

    ctx = all_terms_context(k=1, num_modules=2)
    # LinearSchedule(1, 0) is 0 on the last module: Fails is never called.
    result = Composite([(Fails(), LinearSchedule(1.0, 0.0)), (CrossEntropy(label_smoothing=0.1), 1.0),
                        (CrossEntropy(), 2.0)])(ctx)
    smoothed, plain = CrossEntropy(label_smoothing=0.1)(ctx), CrossEntropy()(ctx)
    torch.testing.assert_close(result.loss, smoothed.loss + 2.0 * plain.loss)
    assert set(result.terms) == {"ce", "ce_2"}
    torch.testing.assert_close(result.terms["ce_2"], plain.loss.detach())
    assert result.correct.item() == smoothed.correct.item()
    # Logits from a head without a fused loss; a term without named terms reports under its class name.

    class Plain(LocalLoss):
        def forward(self, ctx):
            return LocalLossOutput(ctx.outputs.square().mean())

    ctx.head = nn.Sequential(nn.Flatten(), nn.Linear(90, 4))
    out = Composite([Plain(), (CrossEntropy(), 1.0)])(ctx)
    assert set(out.terms) == {"plain", "ce"} and out.logits.shape == (24, 4)
    # (CrossEntropy on logits counts too, so that ignore_index rows stay out of the accuracy)
    assert out.counted.item() == 24 and out.correct.item() == (out.logits.argmax(1) == ctx.target).sum().item()
    # Every weight 0: a zero loss that backward() accepts, and no gradient.
    zero = Composite([(Fails(), 0.0)])(ctx)
    assert zero.loss.item() == 0.0 and zero.terms == {}
    zero.loss.backward()
    assert ctx.outputs.grad is None


def test_composite_in_localnet_with_per_module_schedules(digits):
    x, y = digits
    torch.manual_seed(0)
    loss = Composite([(CrossEntropy(), LinearSchedule(1.0, 3.0)),
                      (TransportRegularized(task=False), LinearSchedule(0.0, 1.0))])
    net = llkern.LocalNet(digits_resnet(3, width=8), num_classes=10, losses=loss, example_input=x[:2])
    result = net.local_step(x[:32], y[:32])
    assert [set(t) for t in result.terms] == [{"ce"}, {"ce", "transport"}, {"ce", "transport"}]
    for k, w_ce, w_tr in [(0, 1.0, 0.0), (1, 2.0, 0.5), (2, 3.0, 1.0)]:
        terms = result.terms[k]
        assert result.losses[k] == pytest.approx(w_ce * terms["ce"] + w_tr * terms.get("transport", 0.0), rel=1e-5)
        assert result.accuracies[k] is not None


def test_localnet_warns_when_a_module_has_every_weight_zero(digits, recwarn):
    # InfoPro's K=2 weights used for 4 modules: module 2 (K-2) gets λ = (0, 0), a module that never trains.
    x, _ = digits
    def two_terms(published_k):  # InfoPro's (reconstruction, task) weights on two terms llkern can run here
        recon, task = llkern.infopro_schedule(*llkern.losses.INFOPRO_WEIGHTS["resnet32", published_k])
        return lambda k, K: Composite([(TransportRegularized(task=False), recon), (CrossEntropy(), task)])

    with pytest.warns(UserWarning, match="module 2's Composite loss has weight 0 at module 2 of 4"):
        llkern.LocalNet(digits_resnet(4, width=8), num_classes=10, example_input=x[:2], losses=two_terms(2))
    recwarn.clear()
    llkern.LocalNet(digits_resnet(4, width=8), num_classes=10, example_input=x[:2], losses=two_terms(4))
    assert not [w for w in recwarn if "weight 0" in str(w.message)]


# --- schedules ---------------------------------------------------------------------------------------------------

def test_linear_schedule_values():
    assert [LinearSchedule(1.0, 3.0)(k, 5) for k in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert LinearSchedule(1.0, 3.0)(0, 1) == 1.0
    infopro_like = LinearSchedule(5.0, 0.0, final=0.5)
    assert [infopro_like(k, 4) for k in range(4)] == [5.0, 2.5, 0.0, 0.5]
    assert [infopro_like(k, 2) for k in range(2)] == [5.0, 0.5]
    assert infopro_like(0, 1) == 0.5
    with pytest.raises(IndexError, match="out of range"):
        infopro_like(4, 4)
    assert "final=0.5" in repr(infopro_like)


def test_infopro_schedule_gives_the_published_weights():
    recon, task = infopro_schedule(*INFOPRO_WEIGHTS["resnet32", 4])  # λ1 6 → 1, λ2 0 → 2 on modules 0..2
    assert [recon(k, 4) for k in range(4)] == [6.0, 3.5, 1.0, 0.0]
    assert [task(k, 4) for k in range(4)] == [0.0, 1.0, 2.0, 1.0]
    # InfoPro's own formula: ratio = k/(K−2) on modules 0..K−2 (0 for K = 2); CE alone on the last module.
    (l1_first, l2_first), (l1_last, l2_last) = INFOPRO_WEIGHTS["resnet110", 16]
    recon, task = infopro_schedule(first=(l1_first, l2_first), last=(l1_last, l2_last))
    for k in range(15):
        ratio = k / 14
        assert recon(k, 16) == pytest.approx(l1_first * (1 - ratio) + l1_last * ratio)
        assert task(k, 16) == pytest.approx(l2_first * (1 - ratio) + l2_last * ratio)
    assert (recon(15, 16), task(15, 16)) == (0.0, 1.0)
    recon, task = infopro_schedule(*INFOPRO_WEIGHTS["resnet32", 2])
    assert [(recon(k, 2), task(k, 2)) for k in range(2)] == [(5.0, 1.0), (0.0, 1.0)]


# --- Reconstruction ----------------------------------------------------------------------------------------------

def recon_context(k=1, num_modules=2, image=True):
    torch.manual_seed(3)
    outputs = torch.randn(6, 7, 5, 3, requires_grad=True)
    x = torch.randn(6, 1, 8, 8)
    return LocalContext(k, num_modules, torch.randn(6, 4, 5, 3), outputs, torch.zeros(6, dtype=torch.long),
                        nn.Identity(), image=x if image else None)


def test_reconstruction_matches_mse_loss():
    ctx = recon_context()
    decoder = ReconstructionDecoder(7, (1, 8, 8))
    result = Reconstruction(decoder, weight=2.5)(ctx)
    mse = F.mse_loss(decoder(ctx.outputs), ctx.image)
    torch.testing.assert_close(result.loss, 2.5 * mse)
    torch.testing.assert_close(result.terms["recon"], mse.detach())
    assert result.logits is None
    result.loss.backward()
    assert ctx.outputs.grad is not None and decoder.decoder[0].weight.grad is not None
    # Module 0 without ctx.image reconstructs its own input (LocalNet's module 0 input is the image).
    first = recon_context(k=0, image=False)
    first.inputs = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(Reconstruction(decoder)(first).loss, F.mse_loss(decoder(first.outputs), first.inputs))


def test_reconstruction_decoder_lists_factories_and_build():
    ctx = recon_context(k=1, num_modules=2)
    shapes = [torch.Size([2, 4, 8, 8]), torch.Size([2, 7, 5, 3])]
    built = Reconstruction(reconstruction_decoders((1, 8, 8)), feature_shapes=shapes)
    assert built.built and [d.decoder[0].in_channels for d in built.decoders] == [4, 7]
    torch.testing.assert_close(built(ctx).loss, F.mse_loss(built.decoders[1](ctx.outputs), ctx.image))
    listed = Reconstruction([ReconstructionDecoder(4, (1, 8, 8)), ReconstructionDecoder(7, (1, 8, 8))])
    assert listed(ctx).loss.item() > 0
    later = Reconstruction(reconstruction_decoders((1, 8, 8)))
    with pytest.raises(RuntimeError, match="build"):
        later(ctx)
    later.build(shapes)
    assert later(ctx).loss.item() > 0
    with pytest.raises(ValueError, match="3 decoders"):
        later(dataclasses.replace(ctx, num_modules=3))


@pytest.mark.parametrize("make,ctx_kwargs,error,match", [
    (lambda: Reconstruction(ReconstructionDecoder(7, (1, 8, 6))), {}, ValueError, r"decoders \(module 1"),
    (lambda: Reconstruction([ReconstructionDecoder(7, (1, 8, 8)), ReconstructionDecoder(7, (2, 8, 8))]), {},
     ValueError, r"expected decoders\[1\].*\[6, 1, 8, 8\], got \[6, 2, 8, 8\]"),
    (lambda: Reconstruction(ReconstructionDecoder(7, (1, 8, 8))), dict(image=False), RuntimeError, "image"),
])
def test_reconstruction_runtime_errors(make, ctx_kwargs, error, match):
    with pytest.raises(error, match=match):
        make()(recon_context(**ctx_kwargs))


# --- errors ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,error,match", [
    (lambda: Composite([]), ValueError, "terms"),
    (lambda: Composite(CrossEntropy()), TypeError, "terms"),
    (lambda: Composite([(CrossEntropy(), -1.0)]), ValueError, r"weight of terms\[0\]"),
    (lambda: Composite([CrossEntropy(), (CrossEntropy(), float("nan"))]), ValueError, r"weight of terms\[1\]"),
    (lambda: Composite([(CrossEntropy(), float("inf"))]), ValueError, r"weight of terms\[0\]"),
    (lambda: Composite([(CrossEntropy(), "1")]), TypeError, r"weight of terms\[0\]"),
    (lambda: Composite([(CrossEntropy(), True)]), TypeError, r"weight of terms\[0\]"),
    (lambda: Composite([(nn.MSELoss(), 1.0)]), TypeError, r"terms\[0\]\[0\]"),
    (lambda: Composite([(CrossEntropy(), 1.0, 2.0)]), TypeError, r"terms\[0\]"),
    (lambda: Reconstruction(ReconstructionDecoder(7, (1, 8, 8)), weight=-0.5), ValueError, "weight"),
    (lambda: Reconstruction(ReconstructionDecoder(7, (1, 8, 8)), weight=float("nan")), ValueError, "weight"),
    (lambda: Reconstruction([]), ValueError, "decoders"),
    (lambda: Reconstruction([nn.Identity(), "decoder"]), TypeError, r"decoders\[1\]"),
    (lambda: Reconstruction("decoder"), TypeError, "decoders"),
    (lambda: Reconstruction(nn.Identity(), feature_shapes=[(2, 3, 4, 4)]), ValueError, "feature_shapes"),
    (lambda: LinearSchedule(-1.0, 1.0), ValueError, "first"),
    (lambda: LinearSchedule(1.0, float("inf")), ValueError, "last"),
    (lambda: LinearSchedule(1.0, 1.0, final=float("nan")), ValueError, "final"),
    (lambda: infopro_schedule(first=(1.0,), last=(0.0, 1.0)), TypeError, "first"),
    (lambda: infopro_schedule(first=(1.0, 1.0), last=(0.0, -1.0)), ValueError, "last"),
    (lambda: TransportRegularized(task="ce"), TypeError, "task"),
])
def test_construction_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_schedule_value_names_the_term():
    loss = Composite([(CrossEntropy(), 1.0), (CrossEntropy(), lambda k, num_modules: -1.0 * k)])
    ctx = all_terms_context(k=1, num_modules=2)
    with pytest.raises(ValueError, match=r"schedule of terms\[1\] at module 1 of 2"):
        loss(ctx)
    with pytest.raises(ValueError, match=r"schedule of terms\[0\]"):
        Composite([(CrossEntropy(), lambda k, num_modules: math.nan)])(ctx)


def test_transport_penalty_alone():
    ctx = all_terms_context()
    result = TransportRegularized(task=False, tau=2.0)(ctx)
    assert set(result.terms) == {"transport"} and result.logits is None
    torch.testing.assert_close(result.loss, sum(transport_penalty(r, None, 2.0) for r in ctx.residuals))
    ctx.residuals = []
    with pytest.warns(UserWarning, match="forward_residual"):
        empty = TransportRegularized(task=False)(ctx)
    empty.loss.backward()  # a zero loss without a graph to the module: backward() still works
    assert empty.loss.item() == 0.0 and ctx.outputs.grad is None


def test_exports():
    for name in ("MLPSRHead", "InfoProHead", "ReconstructionDecoder", "TokenHead", "mlp_sr_heads", "infopro_heads",
                 "reconstruction_decoders", "token_heads", "Composite", "Reconstruction", "LinearSchedule",
                 "infopro_schedule"):
        assert name in llkern.__all__ and hasattr(llkern, name)


def test_infopro_k4_in_localnet(digits):
    # LocalNet passes the image to every module's loss and builds factory decoders from example_input:
    # InfoPro's reconstruction + cross-entropy on K = 4 modules trains without any wrapper
    torch.manual_seed(0)
    x, y = digits
    blocks = digits_resnet(4)
    recon, task = llkern.infopro_schedule((1.0, 0.5), (0.2, 1.0))
    net = llkern.LocalNet(blocks, heads=llkern.infopro_heads(10, 4), example_input=x[:2],
                          losses=lambda k, K: llkern.Composite([
                              (llkern.Reconstruction(llkern.reconstruction_decoders(x.shape[1:])), recon),
                              (llkern.CrossEntropy(), task)]))
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    first = None
    for step in range(12):
        optimizer.zero_grad()
        batch = slice(32 * (step % 4), 32 * (step % 4 + 1))
        result = net.local_step(x[batch], y[batch])
        optimizer.step()
        first = first or result.terms
    assert all("recon" in terms for terms in result.terms[:3]) and "recon" not in result.terms[3]
    assert result.terms[2]["recon"] < first[2]["recon"]
