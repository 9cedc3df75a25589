"""Fused Rényi-2 mutual information (Triton; on the CPU under TRITON_INTERPRET=1, set in conftest): value and
gradient against float64, odd sizes, default and given widths, label kernels, label patterns, strides and
(N, C, H, W) inputs, bfloat16 judged against PyTorch's own bfloat16 error, gradcheck, opcheck, memory without
an N×N matrix, bad input."""

import pytest
import torch

from llkern.ops.context import triton_available
from llkern.ops.renyi_fused import renyi_fused
from llkern.reference.similarity import default_sigma, gram_gaussian, renyi_mutual_information_reference

from .allocations import peak_allocated_bytes
from .test_info_nce_fused import OPCHECK_UTILS, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(torch.device(DEVICE)),
                                reason="needs triton (and a GPU or TRITON_INTERPRET=1)")

# (N, d, classes): one row; tails of the 64-column tiles; d = 1 … 256; every row its own class
SIZES = [(1, 3, 2), (7, 1, 3), (7, 5, 3), (97, 33, 5), (130, 128, 10), (65, 256, 4), (40, 8, 40)]


def make(n, d, classes, dtype=torch.float32, offset=3.0):
    """Rows around their class's centre (so the Gram matrix's entries are far from 0 and 1), plus a common
    offset (which the kernels' centring must take away)."""
    labels = torch.randint(0, classes, (n,), device=DEVICE)
    centres = torch.randn(classes, d, device=DEVICE)
    t = centres[labels] + 0.5 * torch.randn(n, d, device=DEVICE) + offset
    return t.to(dtype).requires_grad_(), labels


def width(d):
    """A width at which rows of d features are neither all alike nor all apart (Silverman's rule is for small d)."""
    return 0.5 * d**0.5


def reference64(t, labels, **options):
    a = t.detach().double().requires_grad_()
    value = renyi_mutual_information_reference(a, labels, **options)
    return value.detach(), torch.autograd.grad(value, [a])[0]


def check64(t, labels, tol, **options):
    value = renyi_fused(t, labels, **options)
    (grad,) = torch.autograd.grad(value, [t])
    ref_value, ref = reference64(t, labels, **options)
    assert value.dtype == (torch.float64 if t.dtype == torch.float64 else torch.float32)
    assert grad.dtype == t.dtype and grad.shape == t.shape
    torch.testing.assert_close(value.double(), ref_value, rtol=tol, atol=tol)
    # (one row, or no pair in reach: the gradient is 0 up to rounding; judged absolutely there)
    assert relative_error(grad, ref) <= tol or (grad.double() - ref).abs().max() <= tol


@pytest.mark.parametrize("n,d,classes", SIZES)
@pytest.mark.parametrize("given_width", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_float64_reference(n, d, classes, given_width, dtype, tol):
    t, labels = make(n, d, classes, dtype)
    check64(t, labels, tol, sigma=width(d) if given_width else None)


def test_the_gram_matrix_is_neither_trivial_nor_saturated():
    # what the tests above rely on: at the widths they give, a good share of the pairs have K² well inside (0, 1);
    # Silverman's rule does so for a few features (at d = 33 it leaves few pairs in reach, as it would in use)
    for n, d, classes in SIZES[2:]:
        for sigma in (width(d), None) if d <= 8 else (width(d),):
            t, _ = make(n, d, classes, torch.float64)
            k2 = gram_gaussian(t.detach(), sigma if sigma is not None else default_sigma(t.detach())) ** 2
            off = k2[~torch.eye(n, dtype=torch.bool, device=DEVICE)]
            assert ((off > 1e-4) & (off < 0.99)).double().mean() > 0.02, (n, d, sigma)


@pytest.mark.parametrize("label_sigma", [0.3, 1.0, 5.0])
def test_label_kernel(label_sigma):
    t, labels = make(97, 6, 4, torch.float64)
    check64(t, labels, 1e-12, label_sigma=label_sigma)


@pytest.mark.parametrize("pattern", ["one class", "pairs", "all different", "int32 labels with negatives"])
def test_label_patterns(pattern):
    n = 37
    t, _ = make(n, 6, 2)
    labels = {"one class": torch.zeros(n, dtype=torch.int64),
              "pairs": torch.arange(n) // 2,
              "all different": torch.arange(n),
              "int32 labels with negatives": (torch.arange(n) % 5 - 2).int()}[pattern].to(DEVICE)
    check64(t, labels, 2e-5)


def test_image_shaped_strided_input_and_scaled_gradient():
    labels = torch.randint(0, 3, (20,), device=DEVICE)
    t = (torch.randn(20, 2, 3, 5, device=DEVICE) + labels[:, None, None, None])[..., ::2].requires_grad_()
    value = renyi_fused(t, labels, sigma=2.0)
    (grad,) = torch.autograd.grad(-3.0 * value, [t])
    ref_value, ref = reference64(t.flatten(1), labels, sigma=2.0)
    torch.testing.assert_close(value.double(), ref_value, rtol=2e-5, atol=2e-5)
    assert grad.shape == t.shape and relative_error(grad.flatten(1), -3.0 * ref) <= 2e-5


def test_the_op_itself_takes_any_strides():
    t, labels = torch.randn(10, 12, device=DEVICE)[:, ::3], torch.randint(0, 3, (20,), device=DEVICE)[::2]
    value = torch.ops.llkern.renyi_fused(t, labels, 1.5, None)[0]
    torch.testing.assert_close(value.double(), reference64(t, labels, sigma=1.5)[0], rtol=2e-5, atol=2e-5)


def reference_on_own_rows(t, labels, sigma):
    """The float64 reference on the op's own rows u (centred, divided by σ, rounded to t's dtype) at width 1, and
    its gradient with respect to t: what the kernels compute, without the rounding of u."""
    _, u, *_ = torch.ops.llkern.renyi_fused(t.detach(), labels, sigma, None)
    a = u.double().requires_grad_()
    value = renyi_mutual_information_reference(a, labels, sigma=1.0)
    return value.detach(), torch.autograd.grad(value, [a])[0] / sigma


def two_clusters(n, d, dtype):
    """Two clusters 100 widths apart (σ = 1), labels across both: |u| ≈ 50 against distances of ~1 within one."""
    side = torch.randint(0, 2, (n,), device=DEVICE)
    labels = torch.randint(0, 3, (n,), device=DEVICE)
    t = (side[:, None] * 2 - 1) * 50.0 + 0.7 * torch.randn(n, d, device=DEVICE)
    return t.to(dtype).requires_grad_(), labels


@pytest.mark.parametrize("case", ["7×5", "97×33", "200×128", "two clusters"])
def test_bfloat16_kernels_against_float64_on_their_own_rows(case):
    # the kernels' own error: products of bfloat16 rows are exact, so the value is float32-exact and the gradient
    # carries H's rounding to bfloat16 and its own (2⁻⁹ each). (|u|² from the rounded rows, and Σ_j Ĥ_ij from the
    # rounded H: either from the unrounded ones puts the value 99 % or the clusters' gradient 10 % off.)
    if case == "two clusters":
        (t, labels), sigma = two_clusters(200, 16, torch.bfloat16), 1.0
    else:
        n, d = map(int, case.split("×"))
        (t, labels), sigma = make(n, d, 5, torch.bfloat16), width(d)
    value = renyi_fused(t, labels, sigma=sigma)
    (grad,) = torch.autograd.grad(value, [t])
    ref_value, ref = reference_on_own_rows(t, labels, sigma)
    assert relative_error(value, ref_value) <= 1e-5
    assert grad.dtype == torch.bfloat16 and relative_error(grad, ref) <= 3 * 2**-9


@pytest.mark.parametrize("n,d,classes", [(7, 5, 3), (97, 33, 5), (200, 128, 10)])
def test_bfloat16_error_relative_to_pytorch(n, d, classes):
    # Against the float64 reference on t itself, beside PyTorch in bfloat16 as autocast runs it (the centred rows
    # and their product in bfloat16, the rest in float32). Both carry the rounding of the centred rows, so each is
    # judged against twice PyTorch's error with a floor at that rounding's size (2⁻⁸ of the gradient, 1e-4 of
    # the value).
    t, labels = make(n, d, classes, torch.bfloat16)
    sigma = width(d)
    value = renyi_fused(t, labels, sigma=sigma)
    (grad,) = torch.autograd.grad(value, [t])
    ref_value, ref = reference64(t, labels, sigma=sigma)
    a = t.detach().clone().requires_grad_()
    u = (a - a.mean(0)) / sigma
    sq = (u.float() ** 2).sum(1)
    k2 = torch.exp(-(sq[:, None] + sq[None, :] - 2 * (u @ u.T).float()).clamp_min(0))
    same = (labels[:, None] == labels[None, :]).float()
    eager = torch.log2((k2 * same).sum()) - torch.log2(k2.sum()) - torch.log2(same.sum()) + 2 * torch.log2(
        torch.tensor(float(n), device=DEVICE))
    (eager_grad,) = torch.autograd.grad(eager, [a])
    assert relative_error(value, ref_value) <= 2 * relative_error(eager, ref_value) + 1e-4
    assert grad.dtype == torch.bfloat16
    assert relative_error(grad, ref) <= 2 * relative_error(eager_grad, ref) + 2**-8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_diagonal_is_exactly_one(dtype):
    # rows a thousand widths apart: every K² off the diagonal is 0, so Σ K² = N exactly; |u_i|² + |u_i|² − 2 u_i·u_i
    # itself is ~1e6 · 2⁻²⁴ off 0 (and the tile that holds the diagonal need not start at the block's first row)
    n = 200
    t = 1000.0 * torch.randn(n, 64, device=DEVICE, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), device=DEVICE)
    totals = torch.ops.llkern.renyi_fused(t.to(dtype), labels, 1.0, None)[3]
    assert totals[0].item() == n


def test_rows_far_apart_and_a_large_common_offset():
    # rows 1000 widths from the origin, 0.1 to 5 widths apart: |u_i|² + |u_j|² − 2 u_i·u_j would lose every digit
    # of the distance without the centring
    t, labels = make(50, 4, 3, torch.float32, offset=1000.0)
    check64(t, labels, 2e-5, sigma=1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_row_gives_a_non_finite_value(bad):
    # (the op itself: unchecked, as on a GPU with value checks off)
    t, labels = make(10, 4, 3, torch.float64)
    t = t.detach()
    t[3, 1] = bad
    assert not torch.isfinite(torch.ops.llkern.renyi_fused(t, labels, 1.0, None)[0])


def test_gradcheck_float64():
    t, labels = make(8, 3, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda a: renyi_fused(a, labels, sigma=1.5), (t,))
    # (with a given width: the default one depends on t but is taken as a constant, as the reference takes it)
    assert torch.autograd.gradcheck(lambda a: renyi_fused(a, labels, sigma=2.0, label_sigma=0.7), (t,))


def test_opcheck():
    t, labels = make(9, 5, 3)
    t = t.detach()
    for sigma, label_sigma in ((None, None), (1.5, 0.7)):
        torch.library.opcheck(torch.ops.llkern.renyi_fused.default, (t, labels, sigma, label_sigma),
                              test_utils=OPCHECK_UTILS)
        _, u, sq, totals, w = torch.ops.llkern.renyi_fused(t, labels, sigma, label_sigma)
        torch.library.opcheck(torch.ops.llkern.renyi_fused_backward.default,
                              (torch.tensor(1.5, device=DEVICE), labels, u, sq, totals, w, label_sigma),
                              test_utils=OPCHECK_UTILS)


def test_double_backward_raises():
    t, labels = make(5, 3, 2, torch.float64)
    value = renyi_fused(t, labels)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(value, [t], create_graph=True)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU allocations, read from the profiler")
def test_nothing_of_the_n_by_n_matrix_is_held():
    # float32, N = 512, d = 16: u, two float32 copies while it is formed, the gradient, vectors of N; never N²
    n, d = 512, 16
    t, labels = make(n, d, 10)

    def step():
        value = renyi_fused(t, labels)
        return torch.autograd.grad(value, [t])

    peak, _ = peak_allocated_bytes(step)
    assert 0 < peak <= 5 * n * d * 4 + 64 * n * 4 < n * n * 4


BAD = [
    (lambda t, y: (t.half(), y), TypeError, "bfloat16, float32 or float64"),
    (lambda t, y: (t.int(), y), TypeError, "t"),
    (lambda t, y: (t, y[:3]), ValueError, "labels"),
    (lambda t, y: (t[:0], y[:0]), ValueError, "non-empty"),
    (lambda t, y: (t[0], y), ValueError, "t"),
    (lambda t, y: (torch.randn(4, 257, device=DEVICE), y), ValueError, "256"),
    (lambda t, y: (t, y.float()), TypeError, "labels"),
]


@pytest.mark.parametrize("mutate,error,match", BAD)
def test_bad_input(mutate, error, match):
    t, labels = make(4, 6, 2)
    with pytest.raises(error, match=match):
        renyi_fused(*mutate(t.detach(), labels))


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("inf"), float("nan"), True])
def test_bad_widths(sigma):
    t, labels = make(4, 6, 2)
    with pytest.raises(ValueError, match="sigma"):
        renyi_fused(t, labels, sigma=sigma)
    with pytest.raises(ValueError, match="label_sigma"):
        renyi_fused(t, labels, label_sigma=sigma)


@pytest.mark.skipif(DEVICE != "cuda", reason="the routing runs on CUDA tensors")
def test_renyi_mutual_information_takes_the_fused_op_for_bfloat16_on_a_gpu():
    from llkern.functional import renyi_mutual_information

    t, labels = make(300, 64, 10, torch.bfloat16)
    value = renyi_mutual_information(t, labels, sigma=4.0)
    assert torch.equal(value, renyi_fused(t, labels, sigma=4.0))
    assert "renyi_fused" in type(value.grad_fn).__name__
    # float32 keeps the blocked op
    value32 = renyi_mutual_information(t.float(), labels, sigma=4.0)
    assert "renyi_fused" not in type(value32.grad_fn).__name__


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile traces into a triton_op's body, and Triton's interpreter "
                    "then runs the kernels on fake tensors: GPU only")
def test_torch_compile_once_for_every_batch_size():
    # (a constant made of N in the graph once made it compile again for every N, dynamic=True or not)
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda t, y: renyi_fused(t, y, sigma=2.0) * 2.0, backend=counter, fullgraph=True, dynamic=True)
    for n in (33, 70, 71):
        t, labels = make(n, 6, 3)
        value = f(t, labels)
        (grad,) = torch.autograd.grad(value, [t])
        ref_value, ref = reference64(t, labels, sigma=2.0)
        torch.testing.assert_close(value.double(), 2 * ref_value, rtol=2e-5, atol=2e-5)
        assert relative_error(grad, 2 * ref) <= 2e-5
    assert counter.frame_count == 1
