"""Fused supervised contrastive loss (Triton; on the CPU under TRITON_INTERPRET=1, set in conftest): loss and
gradient against float64, odd sizes, label patterns (no positives, all one class, singletons), strides,
bfloat16 judged against PyTorch's own bfloat16 error, gradcheck, opcheck, memory without an N×N matrix, bad
input."""

import pytest
import torch
import torch.nn.functional as F

from llkern.ops.context import triton_available
from llkern.ops.info_nce_fused import running_maximum, shared_offset
from llkern.ops.supcon_fused import supcon_fused
from llkern.reference.similarity import supcon_reference

from .allocations import peak_allocated_bytes
from .test_info_nce_fused import OPCHECK_UTILS, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(torch.device(DEVICE)),
                                reason="needs triton (and a GPU or TRITON_INTERPRET=1)")

# (N, d, classes): one row; tails of the 64-column tiles; d = 1 … 256; every row its own class (no anchor)
SIZES = [(1, 3, 2), (7, 1, 3), (7, 5, 3), (97, 33, 5), (130, 128, 10), (65, 256, 4), (40, 8, 40)]


def make(n, d, classes, dtype=torch.float32, scale=1.0):
    z = (scale * torch.randn(n, d, device=DEVICE)).to(dtype).requires_grad_()
    labels = torch.randint(0, classes, (n,), device=DEVICE)
    return z, labels


def reference64(z, labels, tau, **options):
    a = z.detach().double().requires_grad_()
    loss = supcon_reference(a, labels, tau, **options)
    return loss.detach(), torch.autograd.grad(loss, [a])[0]


def check64(z, labels, tau, tol, **options):
    loss = supcon_fused(z, labels, tau, **options)
    (grad,) = torch.autograd.grad(loss, [z])
    ref_loss, ref = reference64(z, labels, tau, **options)
    assert loss.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    assert grad.dtype == z.dtype and grad.shape == z.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    # (d = 1 with normalize, or no anchors: the gradient is 0 up to rounding; judged absolutely there)
    assert relative_error(grad, ref) <= tol or (grad.double() - ref).abs().max() <= tol


@pytest.mark.parametrize("n,d,classes", SIZES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_float64_reference(n, d, classes, normalize, dtype, tol):
    z, labels = make(n, d, classes, dtype, scale=1.0 if normalize else 0.3)
    check64(z, labels, 0.1, tol, normalize=normalize)


@pytest.mark.parametrize("n,d,classes", [(1, 3, 2), (97, 33, 5), (130, 16, 3), (65, 256, 4)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_shared_offset_and_running_maximum_agree_with_float64(n, d, classes, dtype, tol):
    # τ = 0.1 with normalised rows: the backward forms G with one exponential (shared offset) by default
    z, labels = make(n, d, classes, dtype)
    assert shared_offset(0.1, True) is not None
    check64(z, labels, 0.1, tol)
    with running_maximum():
        check64(z, labels, 0.1, tol)


@pytest.mark.parametrize("d,k", [(5, 70), (200, 97)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_a_row_at_the_lowest_scores_the_offset_takes(d, k, dtype, tol):
    # τ at the limit (c = 35): row k against every other row scores −c, so its terms are exp(−70) and
    # α_k = w_k e^70; its own term exp(s_kk − c) α_k, if not left out, would swamp its gradient. (Row 70: in the
    # second block of 64 rows, its diagonal in a later tile than the first; row 97 at d = 200: in the fourth block
    # of 32 rows, whose diagonal lies in the tile of columns 64–127, which starts before the block.)
    n = 100
    z, labels = make(n, d, 3, dtype)
    w = torch.randn(d, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        z[:] = w * torch.rand(n, 1, dtype=dtype, device=DEVICE).add(0.5)
        z[k] = -w
    check64(z, labels, 1.01 / 35, tol)


@pytest.mark.parametrize("pattern", ["one class", "pairs", "no positives", "int32 labels with negatives"])
def test_label_patterns(pattern):
    n = 37
    z, _ = make(n, 6, 2)
    labels = {"one class": torch.zeros(n, dtype=torch.int64),
              "pairs": torch.arange(n) // 2,
              "no positives": torch.arange(n),
              "int32 labels with negatives": (torch.arange(n) % 5 - 2).int()}[pattern].to(DEVICE)
    check64(z, labels, 0.2, 2e-5)
    if pattern == "no positives":
        assert supcon_fused(z, labels, 0.2).item() == 0.0


@pytest.mark.parametrize("n,d,classes", [(7, 5, 3), (97, 33, 5), (200, 128, 10)])
@pytest.mark.parametrize("normalize", [True, False])
def test_bfloat16_error_relative_to_pytorch(n, d, classes, normalize):
    # PyTorch in bfloat16 as autocast runs it: the normalisation and the product in bfloat16, the rest in float32.
    z, labels = make(n, d, classes, torch.bfloat16, scale=1.0 if normalize else 0.3)
    loss = supcon_fused(z, labels, 0.1, normalize=normalize)
    (grad,) = torch.autograd.grad(loss, [z])
    ref_loss, ref = reference64(z, labels, 0.1, normalize=normalize)
    a = z.detach().clone().requires_grad_()
    u = F.normalize(a, dim=1) if normalize else a
    s = (u @ u.T).float() / 0.1
    self_mask = torch.eye(n, dtype=torch.bool, device=DEVICE)
    lse = torch.logsumexp(s.masked_fill(self_mask, float("-inf")), dim=1)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(1)
    per_anchor = (torch.where(positive, s, 0.0).sum(1) - count * lse) / count.clamp_min(1)
    eager = -(torch.where(count > 0, per_anchor, 0.0).sum() / (count > 0).sum().clamp_min(1))
    (eager_grad,) = torch.autograd.grad(eager, [a])
    assert relative_error(loss, ref_loss) <= 2 * relative_error(eager, ref_loss) + 1e-6
    assert grad.dtype == torch.bfloat16
    assert relative_error(grad, ref) <= 2 * relative_error(eager_grad, ref) + 1e-6


def test_a_huge_upstream_gradient():
    # α = w exp(c − LSE) reaches e^70 / anchors; the upstream gradient is multiplied in at the end, not into α
    # (there it overflowed: NaN at 1e9). The loss of two opposite rows of one label is constant: gradient 0.
    x = torch.randn(1, 6, device=DEVICE)
    z = torch.cat([x, -x]).requires_grad_()
    labels = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    loss = supcon_fused(z, labels, 1.01 / 35)
    (grad,) = torch.autograd.grad(loss, [z], grad_outputs=torch.tensor(1e9, device=DEVICE))
    assert torch.isfinite(grad).all() and grad.abs().max() <= 1e9 * 1e-4
    w, labels = make(30, 6, 3)
    (grad,) = torch.autograd.grad(supcon_fused(w, labels, 0.1), [w], grad_outputs=torch.tensor(1e9, device=DEVICE))
    _, ref = reference64(w, labels, 0.1)
    assert relative_error(grad, 1e9 * ref) <= 2e-5


def test_strided_input_and_scaled_gradient():
    z = torch.randn(40, 27, device=DEVICE)[:, :9].requires_grad_()  # row stride 27
    labels = torch.randint(0, 4, (40,), device=DEVICE)
    loss = supcon_fused(z, labels, 0.2)
    (grad,) = torch.autograd.grad(2.5 * loss, [z])
    _, ref = reference64(z, labels, 0.2)
    assert relative_error(grad, 2.5 * ref) <= 2e-5
    w = torch.randn(40, 18, device=DEVICE)[:, ::2].requires_grad_()  # column stride 2: copied
    check64(w, labels, 0.2, 2e-5)


def test_the_op_itself_takes_any_strides():
    z, labels = torch.randn(12, 8, device=DEVICE)[:, ::2], torch.randint(0, 3, (24,), device=DEVICE)[::2]
    loss = torch.ops.llkern.supcon_fused(z, labels, 0.2, True)[0]
    torch.testing.assert_close(loss.double(), reference64(z, labels, 0.2)[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("normalize", [True, False])
def test_a_non_finite_row_gives_a_non_finite_loss(bad, normalize):
    # (unchecked, as on a GPU with value checks off: the op itself) a row of its own label meets every other
    # row's log-sum-exp; a NaN or inf there must not turn into a finite loss
    z = torch.randn(10, 4, dtype=torch.float64, device=DEVICE)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 9], device=DEVICE)
    z[9, 0] = bad
    loss = torch.ops.llkern.supcon_fused(z, labels, 0.1, normalize)[0]
    assert not torch.isfinite(loss)


def test_float64_rows_at_and_below_the_norm_clamp():
    z, labels = make(9, 3, 2, torch.float64)
    with torch.no_grad():
        z[1] = torch.tensor([1e-12, 0.0, 0.0])  # at the clamp: clamp_min passes the gradient
        z[4] *= 1e-14 / z[4].norm()  # below: only divided by eps
    check64(z, labels, 0.5, 1e-12)


def test_small_temperature_and_a_row_at_the_norm_clamp():
    z, labels = make(30, 6, 3)
    with torch.no_grad():
        z[4] = 0.0
    check64(z, labels, 0.01, 5e-5)


def test_gradcheck_float64():
    z, labels = make(8, 4, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda a: supcon_fused(a, labels, 0.5), (z,))


def test_opcheck():
    utils = OPCHECK_UTILS
    z, labels = make(9, 5, 3)
    z = z.detach()
    for normalize in (True, False):
        torch.library.opcheck(torch.ops.llkern.supcon_fused.default, (z, labels, 0.2, normalize), test_utils=utils)
        _, u, norm, lse, count = torch.ops.llkern.supcon_fused(z, labels, 0.2, normalize)
        torch.library.opcheck(torch.ops.llkern.supcon_fused_backward.default,
                              (torch.tensor(1.5, device=DEVICE), z, labels, u, norm, lse, count, 0.2, normalize),
                              test_utils=utils)


def test_double_backward_raises():
    z, labels = make(5, 3, 2, torch.float64)
    loss = supcon_fused(z, labels, 0.5)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, [z], create_graph=True)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU allocations, read from the profiler")
def test_nothing_of_the_n_by_n_matrix_is_held():
    n, d = 512, 16
    z, labels = make(n, d, 10)

    def step():
        loss = supcon_fused(z, labels, 0.1)
        return torch.autograd.grad(loss, [z])

    peak, _ = peak_allocated_bytes(step)
    assert 0 < peak <= 4 * n * d * 4 + 64 * n * 4 < n * n * 4


@pytest.mark.skipif(DEVICE != "cuda", reason="the routing runs on CUDA tensors")
def test_supcon_loss_takes_the_fused_op_for_bfloat16_on_a_gpu():
    from llkern.functional import supcon_loss

    z, labels = make(300, 64, 10, torch.bfloat16)
    assert torch.equal(supcon_loss(z, labels, 0.1), supcon_fused(z, labels, 0.1))


BAD = [
    (lambda z, y: (z.half(), y), TypeError, "bfloat16, float32 or float64"),
    (lambda z, y: (z.int(), y), TypeError, "z"),
    (lambda z, y: (z, y[:3]), ValueError, "labels of shape"),
    (lambda z, y: (z, y.float()), TypeError, "integer labels"),
    (lambda z, y: (z[:0], y[:0]), ValueError, "non-empty"),
    (lambda z, y: (torch.randn(4, 257, device=DEVICE), y), ValueError, "256"),
]


@pytest.mark.parametrize("mutate,error,match", BAD)
def test_bad_input(mutate, error, match):
    z, labels = make(4, 6, 2)
    with pytest.raises(error, match=match):
        supcon_fused(*mutate(z.detach(), labels), 0.1)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(temperature):
    z, labels = make(4, 6, 2)
    with pytest.raises(ValueError, match="temperature"):
        supcon_fused(z.detach(), labels, temperature)
