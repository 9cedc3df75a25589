"""Edge cases of llkern.nn's heads, local losses, context supply and the transformer model, each against a plain
float64 PyTorch computation, or a clear exception naming the argument."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llkern.models.transformer import TokenEmbed, TransformerBlock, transformer_encoder
from llkern.nn.context import ContextSupply
from llkern.nn.heads import InfoProHead, LinearHead, MLPSRHead, ProjectionHead, ReconstructionDecoder, TokenHead
from llkern.nn.losses import (
    Composite,
    CrossEntropy,
    LocalContext,
    MutualInformation,
    Reconstruction,
    SupervisedContrastive,
    TransportRegularized,
)
from llkern.nn.transport import TransportPenalty

# --- TRGL ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [TransportRegularized, TransportPenalty])
@pytest.mark.parametrize("tau, error", [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                                        (math.nan, ValueError), (True, TypeError), ("1", TypeError),
                                        (None, TypeError)])
def test_transport_tau_must_be_a_finite_positive_number(cls, tau, error):
    with pytest.raises(error, match="tau"):
        cls(tau=tau)


def test_transport_regularized_checks_reduction_when_built():
    with pytest.raises(ValueError, match="reduction"):
        TransportRegularized(reduction="sum")


def _residual_context(k, num_modules, dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=dtype)
    r1 = torch.randn(4, 3, 5, 5, dtype=dtype, requires_grad=True)
    r2 = torch.randn(4, 3, 5, 5, dtype=dtype, requires_grad=True)
    head = LinearHead(3, 3).to(dtype)
    y = x + r1 + r2
    return LocalContext(k, num_modules, x, y, torch.tensor([0, 1, 2, -100]), head, [r1, r2])


@pytest.mark.parametrize("k, tau_k", [(0, 0.35), (1, 0.35), (2, 0.7), (3, 0.7)])
def test_transport_regularized_is_task_plus_blocks_penalty_in_float64(k, tau_k):
    ctx = _residual_context(k, 4)
    out = TransportRegularized(tau=0.7, tau_schedule="varying")(ctx)
    logits = ctx.head(ctx.outputs)
    ce = F.cross_entropy(logits, ctx.target)
    penalty = sum((r.detach() ** 2).mean() for r in ctx.residuals) / (2 * tau_k)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, ce + penalty, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.terms["transport"], penalty.detach(), rtol=1e-12, atol=1e-12)
    # on="module": r = y - x of the whole module, per sample summed with "sum_per_sample"
    per_module = TransportRegularized(tau=0.7, on="module", reduction="sum_per_sample", task=False)(ctx)
    r = (ctx.outputs - ctx.inputs).detach()
    torch.testing.assert_close(per_module.loss, (r ** 2).sum() / (2 * 0.7 * 4), rtol=1e-12, atol=1e-12)


def test_transport_penalty_alone_keeps_float64():
    ctx = _residual_context(0, 2)
    out = TransportRegularized(task=False, tau=0.3)(ctx)
    penalty = sum((r.detach() ** 2).mean() for r in ctx.residuals) / 0.6
    assert out.loss.dtype == torch.float64 and set(out.terms) == {"transport"}
    torch.testing.assert_close(out.loss, penalty, rtol=1e-14, atol=0.0)
    out.loss.backward()
    torch.testing.assert_close(ctx.residuals[0].grad, ctx.residuals[0].detach() / (0.3 * ctx.residuals[0].numel()))


# --- cross-entropy --------------------------------------------------------------------------------------------------


def test_cross_entropy_on_logits_with_every_target_ignored_is_zero_not_nan():
    torch.manual_seed(0)
    head = MLPSRHead(3, 4).double().eval()
    outputs = torch.randn(4, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    ctx = LocalContext(0, 2, outputs.detach(), outputs, torch.full((4,), -100), head)
    out = CrossEntropy()(ctx)
    assert out.loss.item() == 0.0 and out.counted.item() == 0 and out.correct.item() == 0
    out.loss.backward()
    assert torch.isfinite(outputs.grad).all() and outputs.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_on_logits_matches_float64_and_counts_only_kept_targets(smoothing):
    torch.manual_seed(0)
    head = MLPSRHead(3, 4).double().eval()
    outputs = torch.randn(5, 4, 7, 7, dtype=torch.float64)
    target = torch.tensor([0, 2, -100, 1, -100])
    out = CrossEntropy(label_smoothing=smoothing)(LocalContext(0, 2, outputs, outputs, target, head))
    logits = head(outputs)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, target, label_smoothing=smoothing),
                               rtol=1e-12, atol=1e-12)
    keep = target != -100
    assert out.counted.item() == 3
    assert out.correct.item() == (logits.argmax(1)[keep] == target[keep]).sum().item()


def test_cross_entropy_checks_its_arguments():
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(label_smoothing=2.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(label_smoothing=-0.1)
    with pytest.raises(TypeError, match="ignore_index"):
        CrossEntropy(ignore_index=1.5)
    head = MLPSRHead(3, 4).eval()
    x = torch.randn(4, 4, 5, 5)
    with pytest.raises(ValueError, match="target"):
        CrossEntropy()(LocalContext(0, 2, x, x, torch.tensor([0, 1, 2]), head))


# --- supervised contrastive and mutual information ------------------------------------------------------------------


def _supcon64(z, y, tau):
    z = F.normalize(z.double(), dim=1)
    s = z @ z.T / tau
    total, anchors = 0.0, 0
    for i in range(len(y)):
        positives = [p for p in range(len(y)) if p != i and y[p] == y[i]]
        if not positives:
            continue
        lse = torch.logsumexp(torch.stack([s[i, a] for a in range(len(y)) if a != i]), 0)
        total = total - sum(s[i, p] - lse for p in positives) / len(positives)
        anchors += 1
    return total / max(anchors, 1)


def test_supervised_contrastive_leaves_out_ignore_index_tokens():
    torch.manual_seed(0)
    head = ProjectionHead(16, 6).double()
    tokens = torch.randn(2, 5, 6, dtype=torch.float64)
    target = torch.tensor([[0, 1, 0, -100, -100], [1, 1, 0, 2, -100]])
    out = SupervisedContrastive()(LocalContext(0, 3, tokens, tokens, target, head))
    z, y = head(tokens).reshape(-1, 16), target.reshape(-1)
    keep = y != -100
    torch.testing.assert_close(out.loss, _supcon64(z[keep], y[keep], 0.07), rtol=1e-10, atol=1e-12)
    # ignore_index=None: -100 is a label like any other
    every = SupervisedContrastive(ignore_index=None)(LocalContext(0, 3, tokens, tokens, target, head))
    torch.testing.assert_close(every.loss, _supcon64(z, y, 0.07), rtol=1e-10, atol=1e-12)
    # every sample ignored: 0, and backward still works
    outputs = tokens.clone().requires_grad_()
    none = SupervisedContrastive()(LocalContext(0, 3, tokens, outputs, torch.full((2, 5), -100), head))
    assert none.loss.item() == 0.0
    none.loss.backward()
    assert outputs.grad.abs().max().item() == 0.0
    with pytest.raises(TypeError, match="ignore_index"):
        SupervisedContrastive(ignore_index=1.5)


def test_mutual_information_rms_width_is_float64_for_float64_rows():
    torch.manual_seed(0)
    x = torch.randn(8, 6, 7, 7, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2])
    out = MutualInformation()(LocalContext(0, 3, x, x, y, ProjectionHead(4, 6)))
    t = x.flatten(1)
    sigma = 0.5 * math.sqrt(2 * t.var(0).sum().item())
    k = torch.exp(-torch.cdist(t, t) ** 2 / (2 * sigma ** 2))
    a = k / k.trace()
    b = (y[:, None] == y[None, :]).double()
    b = b / b.trace()
    ab = a * b / (a * b).trace()
    entropy = lambda m: -math.log2((m ** 2).sum().item())  # noqa: E731
    mi = entropy(a) + entropy(b) - entropy(ab)
    assert abs(-out.loss.item() - mi) < 1e-12


# --- context supply -------------------------------------------------------------------------------------------------

SHAPES = [torch.Size([2, 3, 8, 8]), torch.Size([2, 4, 8, 8]), torch.Size([2, 6, 4, 4])]


def test_context_supply_under_autocast_adds_in_the_boundary_dtype():
    torch.manual_seed(0)
    supply = ContextSupply("RE", SHAPES, impl="reference")
    image, previous, boundary = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = supply(2, boundary, image, previous)  # float32 boundary, bfloat16 encoder outputs
        expected = (boundary + F.avg_pool2d(supply.image_encoders[1](image).float(), 2)
                    + F.avg_pool2d(supply.previous_encoders[1](previous).float(), 2))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_context_supply_errors_name_the_argument():
    with pytest.raises(ValueError, match="input_shapes"):
        ContextSupply("E", [])
    with pytest.raises(ValueError, match="spatial size"):
        ContextSupply("RE", [torch.Size([2, 3, 7, 7]), torch.Size([2, 4, 0, 0])])
    supply = ContextSupply("RE", SHAPES, impl="reference")
    with pytest.raises(IndexError, match="k=3"):
        supply(3, torch.randn(2, 6, 4, 4), torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8))
    assert "mode='RE'" in repr(supply) and "image_scales=[1, 2]" in repr(supply)


def test_context_supply_state_dict_round_trip():
    torch.manual_seed(0)
    supply = ContextSupply("RE", SHAPES, impl="reference")
    supply(2, torch.randn(2, 6, 4, 4), torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8))  # moves BN statistics
    other = ContextSupply("RE", SHAPES, impl="reference")
    other.load_state_dict(supply.state_dict())
    supply.eval(), other.eval()
    args = (torch.randn(2, 6, 4, 4), torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8))
    assert torch.equal(supply(2, *args), other(2, *args))


# --- transformer ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [({"num_heads": 0}, "num_heads"), ({"dim": 0}, "dim"),
                                           ({"num_classes": 0}, "num_classes"), ({"depth": 0}, "depth"),
                                           ({"mlp_ratio": 0.0}, "mlp_ratio"), ({"vocab_size": 0}, "vocab_size")])
def test_transformer_encoder_checks_its_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        transformer_encoder(**kwargs)


def test_transformer_inputs_are_checked():
    with pytest.raises(ValueError, match="token ids"):  # T = 0 would give NaN logits
        TokenEmbed(vocab_size=5, max_len=4, dim=8)(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):
        TransformerBlock(8, 2)(torch.randn(2, 8))
    block = TransformerBlock(8, 2).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    y, r = block.forward_residual(x)
    assert torch.equal(y, x + r)


# --- heads: arguments, reprs, state dicts ---------------------------------------------------------------------------


def test_linear_head_checks_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        LinearHead(2.5, 4)
    with pytest.raises(ValueError, match="in_channels"):
        LinearHead(2, 0)


def test_reprs_show_the_settings():
    assert "tau=0.5" in repr(TransportRegularized(tau=0.5)) and "'varying'" in repr(
        TransportRegularized(tau_schedule="varying"))
    assert "label_smoothing=0.1" in repr(CrossEntropy(label_smoothing=0.1))
    assert "temperature=0.07" in repr(SupervisedContrastive())
    assert "sigma='rms'" in repr(MutualInformation())
    assert "weights=[1.0, 0.5]" in repr(Composite([CrossEntropy(), (TransportRegularized(task=False), 0.5)]))
    assert "weight=2.0" in repr(Reconstruction(ReconstructionDecoder(4, (1, 8, 8)), 2.0))
    assert "num_classes=3" in repr(LinearHead(3, 4)) and "pool=True" in repr(TokenHead(3, 4, pool=True))
    assert "reduce=4" in repr(MLPSRHead(3, 4)) and "image_shape=(1, 8, 8)" in repr(ReconstructionDecoder(4, (1, 8, 8)))


@pytest.mark.parametrize("make, shape", [
    (lambda: LinearHead(3, 4), (2, 4, 7, 7)), (lambda: TokenHead(3, 4), (2, 5, 4)),
    (lambda: MLPSRHead(3, 4), (2, 4, 7, 7)), (lambda: InfoProHead(3, 4), (2, 4, 1, 1)),
    (lambda: ProjectionHead(8, 4), (2, 4, 7, 7)), (lambda: ReconstructionDecoder(4, (1, 7, 7)), (2, 4, 3, 3)),
])
def test_head_state_dict_round_trip(make, shape):
    torch.manual_seed(0)
    head = make()
    x = torch.randn(*shape)
    head(x)  # training mode: moves BN statistics
    other = make()
    other.load_state_dict(head.state_dict())
    head.eval(), other.eval()
    assert torch.equal(head(x), other(x))
