"""Fused InfoNCE (Triton; on the CPU under TRITON_INTERPRET=1, set in conftest): loss and both gradients
against float64, odd sizes, strides, bfloat16 judged against PyTorch's own bfloat16 error, gradcheck,
opcheck, torch.compile, memory without an N×N matrix, bad input."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from llkern.ops import info_nce_fused as fused_module
from llkern.ops.context import triton_available
from llkern.ops.info_nce_fused import fused_fits, info_nce_fused, running_maximum, shared_offset
from llkern.reference.similarity import info_nce_reference

from .allocations import peak_allocated_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not triton_available(torch.device(DEVICE)),
                                reason="needs triton (and a GPU or TRITON_INTERPRET=1)")

SIZES = [(1, 3), (7, 1), (7, 5), (97, 33), (130, 128), (65, 256)]  # N below, at and past a tile; d = 1 … 256
OPTIONS = [(False, True), (True, True), (False, False), (True, False)]  # (symmetric, normalize)


def views(n, d, dtype=torch.float32, scale=1.0):
    z1 = (scale * torch.randn(n, d, device=DEVICE)).to(dtype).requires_grad_()
    z2 = (scale * torch.randn(n, d, device=DEVICE)).to(dtype).requires_grad_()
    return z1, z2


def reference64(z1, z2, tau, **options):
    a, b = (z.detach().double().requires_grad_() for z in (z1, z2))
    loss = info_nce_reference(a, b, tau, **options)
    return loss.detach(), torch.autograd.grad(loss, [a, b])


def assert_matches64(z1, z2, tau, tol=2e-5, **options):
    """The fused loss and both gradients against float64: the loss to tol, each gradient to tol relatively."""
    loss = info_nce_fused(z1, z2, tau, **options)
    grads = torch.autograd.grad(loss, [z1, z2])
    ref_loss, ref = reference64(z1, z2, tau, **options)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    for g, r in zip(grads, ref, strict=True):
        assert relative_error(g, r) <= tol


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("symmetric,normalize", OPTIONS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_float64_reference(n, d, symmetric, normalize, dtype, tol):
    z1, z2 = views(n, d, dtype, scale=1.0 if normalize else 0.3)
    loss = info_nce_fused(z1, z2, 0.1, symmetric=symmetric, normalize=normalize)
    grads = torch.autograd.grad(loss, [z1, z2])
    ref_loss, ref = reference64(z1, z2, 0.1, symmetric=symmetric, normalize=normalize)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    for g, r, z in zip(grads, ref, (z1, z2), strict=True):
        assert g.dtype == z.dtype and g.shape == z.shape
        # (d = 1 with normalize: the gradient is 0 up to rounding; judged absolutely there)
        assert relative_error(g, r) <= tol or (g.double() - r).abs().max() <= tol


@pytest.mark.parametrize("n,d", [(7, 5), (97, 33), (200, 128)])
@pytest.mark.parametrize("symmetric,normalize", OPTIONS)
def test_bfloat16_error_relative_to_pytorch(n, d, symmetric, normalize):
    # PyTorch in bfloat16 as autocast runs it: normalisation and the product in bfloat16, the
    # cross-entropy in float32.
    z1, z2 = views(n, d, torch.bfloat16, scale=1.0 if normalize else 0.3)
    loss = info_nce_fused(z1, z2, 0.1, symmetric=symmetric, normalize=normalize)
    grads = torch.autograd.grad(loss, [z1, z2])
    ref_loss, ref = reference64(z1, z2, 0.1, symmetric=symmetric, normalize=normalize)
    a, b = (z.detach().clone().requires_grad_() for z in (z1, z2))
    u1, u2 = (F.normalize(a, dim=1), F.normalize(b, dim=1)) if normalize else (a, b)
    s = (u1 @ u2.T).float() / 0.1
    target = torch.arange(n, device=DEVICE)
    eager = F.cross_entropy(s, target)
    if symmetric:
        eager = 0.5 * (eager + F.cross_entropy(s.T, target))
    eager_grads = torch.autograd.grad(eager, [a, b])
    assert relative_error(loss, ref_loss) <= 2 * relative_error(eager, ref_loss) + 1e-6
    for g, e, r in zip(grads, eager_grads, ref, strict=True):
        assert g.dtype == torch.bfloat16
        assert relative_error(g, r) <= 2 * relative_error(e, r) + 1e-6


# 400: programs take several row blocks; 192: a multiple of the 64 columns but not of the 128 rows (not EVEN)
@pytest.mark.parametrize("n,d", [(130, 16), (400, 8), (256, 32), (192, 16)])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_shared_offset_and_running_maximum_agree_with_float64(n, d, symmetric, dtype, tol):
    # The same inputs through both forms of the log-sum-exps (τ = 0.1 takes the shared offset by default)
    z1, z2 = views(n, d, dtype)
    ref_loss, ref = reference64(z1, z2, 0.1, symmetric=symmetric)
    for form in (contextlib.nullcontext, running_maximum):
        with form():
            loss = info_nce_fused(z1, z2, 0.1, symmetric=symmetric)
            grads = torch.autograd.grad(loss, [z1, z2])
        torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
        for g, r in zip(grads, ref, strict=True):
            assert relative_error(g, r) <= tol


def test_shared_offset_bounds():
    assert shared_offset(0.1, True) == pytest.approx(10.1)
    assert shared_offset(1.01 / 35, True) == pytest.approx(35.0)
    assert shared_offset(1.01 / 35.01, True) is None  # the smallest terms would leave float32's normal range
    assert shared_offset(0.1, False) is None  # unbounded scores
    with running_maximum():
        assert shared_offset(0.1, True) is None
    assert shared_offset(0.1, True) is not None


def lowest_scores(n, d, dtype, transpose):
    """Every column along w and row 0 against it: row 0 scores −1/τ against all (transpose: the same for column 0)."""
    z1, z2 = (z.detach() for z in views(n, d, dtype))
    w = torch.randn(d, dtype=dtype, device=DEVICE)
    z2[:] = w * torch.rand(n, 1, dtype=dtype, device=DEVICE).add(0.5)  # (lengths differ; directions do not)
    z1[0] = -w
    return (z2, z1) if transpose else (z1, z2)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_rows_and_columns_at_the_lowest_scores_the_offset_takes(transpose, dtype, tol):
    # τ at the limit (c = 35): row (or column) 0 scores −c everywhere, so its terms are exp(−70), still normal
    # float32 numbers: its log-sum-exp and its gradients hold.
    tau = 1.01 / 35
    assert shared_offset(tau, True) is not None
    z1, z2 = (z.requires_grad_() for z in lowest_scores(50, 6, dtype, transpose))
    assert_matches64(z1, z2, tau, tol, symmetric=True)


def test_each_form_launches_only_its_kernels(monkeypatch):
    # wrap_triton refuses a kernel that is not a triton.jit function: a form that launches the other's fails
    from llkern.triton_kernels import info_nce as kernels

    z1, z2 = views(20, 4)
    refused = "wrap_triton only works on functions annotated with triton.jit"
    monkeypatch.setattr(kernels, "row_lse", None)
    torch.autograd.grad(info_nce_fused(z1, z2, 0.1, symmetric=True), [z1, z2])  # shared offset: row_sums only
    with running_maximum(), pytest.raises(RuntimeError, match=refused):
        info_nce_fused(z1, z2, 0.1, symmetric=True)
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "row_sums", None)
    with running_maximum():
        torch.autograd.grad(info_nce_fused(z1, z2, 0.1, symmetric=True), [z1, z2])
    with pytest.raises(RuntimeError, match=refused):
        info_nce_fused(z1, z2, 0.1, symmetric=True)


def test_the_backward_keeps_the_form_of_its_forward():
    # the forward's form is recorded for its backward: switching in between changes nothing
    z1, z2 = views(70, 6)
    _, ref = reference64(z1, z2, 0.1, symmetric=True)
    for forward_form, backward_form in ((contextlib.nullcontext, running_maximum),
                                        (running_maximum, contextlib.nullcontext)):
        with forward_form():
            loss = info_nce_fused(z1, z2, 0.1, symmetric=True)
        with backward_form():
            grads = torch.autograd.grad(loss, [z1, z2])
        for g, r in zip(grads, ref, strict=True):
            assert relative_error(g, r) <= 2e-5


def test_too_many_column_sums_take_the_two_pass_form(monkeypatch):
    z1, z2 = views(200, 8)
    assert fused_module._one_pass(z1, 0.1, True, True)
    monkeypatch.setattr(fused_module, "COLUMN_SUMS_BYTES", 200 * 4 - 1)  # not one row of N float32 values
    assert not fused_module._one_pass(z1, 0.1, True, True)
    assert fused_module._one_pass(z1, 0.1, False, True)  # (one-way: no column sums)
    from llkern.triton_kernels import info_nce as kernels

    monkeypatch.setattr(kernels, "row_sums", None)
    assert_matches64(z1, z2, 0.1, symmetric=True)


def test_programs_taking_several_row_blocks(monkeypatch):
    # three programs over 1000 rows (8 blocks): on a GPU they run at once and each adds into its own row of the
    # partial column sums; under the interpreter one after another
    monkeypatch.setattr(fused_module, "_programs", lambda blocks, n, value_bytes, device: min(blocks, 3))
    assert_matches64(*views(1000, 16), 0.1, symmetric=True)


def confident_views(n, d, noise, dtype):
    """Pairs close to each other: the loss is small, p_ii near 1 and G_ii = w (p_ii − 1) small."""
    base = torch.randn(n, d, device=DEVICE)
    return ((base + noise * torch.randn(n, d, device=DEVICE)).to(dtype).requires_grad_(),
            (base + noise * torch.randn(n, d, device=DEVICE)).to(dtype).requires_grad_())


@pytest.mark.parametrize("symmetric,noise", [(False, 0.2), (True, 0.1)])
def test_bfloat16_gradient_where_the_loss_is_small(symmetric, noise):
    # G_ii's −w must be added before G is rounded to bfloat16: after, the rounding of w p_ii (w/256) would be
    # larger than G_ii itself (the shared form's gradient was off by 120 % here)
    z1, z2 = confident_views(200, 64, noise, torch.bfloat16)
    grads = torch.autograd.grad(info_nce_fused(z1, z2, 0.07, symmetric=symmetric), [z1, z2])
    _, ref = reference64(z1, z2, 0.07, symmetric=symmetric)
    with running_maximum():
        maximum_grads = torch.autograd.grad(info_nce_fused(z1, z2, 0.07, symmetric=symmetric), [z1, z2])
    for g, m, r in zip(grads, maximum_grads, ref, strict=True):
        assert relative_error(g, r) <= 1.2 * relative_error(m, r) + 1e-6 and relative_error(g, r) < 0.03


@pytest.mark.parametrize("symmetric,noise", [(False, 0.2), (True, 0.05)])
def test_float32_loss_where_it_is_small(symmetric, noise):
    # log(sum / exp(s_ii − c)), not c + log(sum) − s_ii: the difference of two numbers near c lost ~1e-6 of a loss
    # of 1e-3 (relative error 1.2e-3)
    z1, z2 = confident_views(200, 64, noise, torch.float32)
    loss = info_nce_fused(z1, z2, 0.07, symmetric=symmetric)
    ref_loss, _ = reference64(z1, z2, 0.07, symmetric=symmetric)
    assert ref_loss < 2e-3
    assert abs(loss.double() - ref_loss) / ref_loss < 5e-5


def test_partial_column_sums_take_one_row_per_program_within_a_budget():
    cpu = torch.device("cpu")
    assert fused_module._programs(1, 100, 4, cpu) == 1
    assert fused_module._programs(1000, 100, 4, cpu) == fused_module.INTERPRETER_PROGRAMS
    if DEVICE == "cuda":
        gpu = torch.device("cuda")
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert fused_module._programs(256, 32768, 4, gpu) == min(256, 2 * sms)  # 32 MiB on an H200
        n = 2**17
        programs = fused_module._programs(n // 128, n, 4, gpu)
        assert programs is None or (sms <= programs and programs * n * 4 <= fused_module.COLUMN_SUMS_BYTES)
        assert fused_module._programs(2**20 // 128, 2**20, 4, gpu) is None  # (64 programs: the two-pass form)


def test_strided_inputs():
    z1 = torch.randn(40, 27, device=DEVICE)[:, :9].requires_grad_()  # row stride 27
    z2 = torch.randn(40, 18, device=DEVICE)[:, ::2].requires_grad_()  # column stride 2: copied
    assert_matches64(z1, z2, 0.2, symmetric=True)


def test_the_op_itself_takes_any_strides():
    z1, z2 = torch.randn(10, 8, device=DEVICE)[:, ::2], torch.randn(4, 10, device=DEVICE).T
    loss = torch.ops.llkern.info_nce_fused(z1, z2, 0.2, True, True)[0]
    torch.testing.assert_close(loss.double(), reference64(z1, z2, 0.2, symmetric=True)[0], rtol=2e-5, atol=2e-5)


def test_float64_rows_below_the_norm_clamp():
    # |z| < 1e-12: F.normalize divides by eps (exactly 1e-12 in float64) and passes the gradient unprojected
    z1, z2 = views(9, 4, torch.float64)
    with torch.no_grad():
        z1[2] *= 1e-14 / z1[2].norm()
        z2[5] *= 3e-13 / z2[5].norm()
        z1[6] = torch.tensor([1e-12, 0.0, 0.0, 0.0])  # exactly at the clamp: clamp_min passes the gradient
    loss = info_nce_fused(z1, z2, 0.5, symmetric=True)
    grads = torch.autograd.grad(loss, [z1, z2])
    ref_loss, ref = reference64(z1, z2, 0.5, symmetric=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref, strict=True):
        assert relative_error(g, r) <= 1e-12


def test_scaled_upstream_gradient_and_one_input_needing_grad():
    z1, z2 = views(33, 7)
    z2 = z2.detach()
    loss = info_nce_fused(z1, z2, 0.3)
    (g,) = torch.autograd.grad(3.0 * loss, [z1])
    _, ref = reference64(z1, z2, 0.3)
    assert relative_error(g, 3 * ref[0]) <= 2e-5
    # the backward forms only the gradient asked for
    saved = [t.detach() for t in torch.ops.llkern.info_nce_fused(z1.detach(), z2, 0.3, False, True)[1:]]
    d1, d2 = torch.ops.llkern.info_nce_fused_backward(torch.tensor(3.0, device=DEVICE), z1.detach(), z2, *saved, 0.3,
                                                      False, True, True, True, False)
    assert d2.numel() == 0 and relative_error(d1, 3 * ref[0]) <= 2e-5


def test_small_temperature_and_rows_at_the_norm_clamp():
    z1, z2 = views(20, 6)
    with torch.no_grad():
        z1[3] = 0.0  # |z| = 0: F.normalize's clamp, gradient only divided by eps there
    loss = info_nce_fused(z1, z2, 0.01, symmetric=True)
    grads = torch.autograd.grad(loss, [z1, z2])
    ref_loss, ref = reference64(z1, z2, 0.01, symmetric=True)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
    for g, r in zip(grads, ref, strict=True):
        assert relative_error(g, r) <= 5e-5


def test_gradcheck_float64():
    z1, z2 = views(6, 4, torch.float64)
    for symmetric in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, s=symmetric: info_nce_fused(a, b, 0.5, symmetric=s), (z1, z2))


# AOT dispatch traces into a triton_op's body with fake tensors, and Triton's interpreter then tries to run the
# kernels on them: that part of opcheck runs on a GPU only (as for context_add). (Also test_supcon_fused's.)
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + (
    ("test_aot_dispatch_dynamic",) if DEVICE == "cuda" else ())


def test_opcheck():
    z1, z2 = (z.detach() for z in views(9, 5))
    for symmetric, normalize in OPTIONS:
        torch.library.opcheck(torch.ops.llkern.info_nce_fused.default, (z1, z2, 0.2, symmetric, normalize),
                              test_utils=OPCHECK_UTILS)
        _, u1, u2, n1, n2, stats = torch.ops.llkern.info_nce_fused(z1, z2, 0.2, symmetric, normalize)
        shared = fused_module._one_pass(z1, 0.2, symmetric, normalize)
        assert shared == normalize
        for wanted in ((True, True), (False, True)):
            torch.library.opcheck(torch.ops.llkern.info_nce_fused_backward.default,
                                  (torch.tensor(1.5, device=DEVICE), z1, z2, u1, u2, n1, n2, stats, 0.2, symmetric,
                                   normalize, shared, *wanted), test_utils=OPCHECK_UTILS)


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile traces into a triton_op's body, and Triton's interpreter "
                    "then runs the kernels on fake tensors: GPU only")
def test_torch_compile_fullgraph():
    z1, z2 = views(17, 6)

    def f(a, b):
        return info_nce_fused(a, b, 0.2, symmetric=True) * 2.0

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(z1, z2)
    grads = torch.autograd.grad(out, [z1, z2])
    ref_loss, ref = reference64(z1, z2, 0.2, symmetric=True)
    torch.testing.assert_close(out.double(), 2 * ref_loss, rtol=2e-5, atol=2e-5)
    for g, r in zip(grads, ref, strict=True):
        assert relative_error(g, 2 * r) <= 2e-5


def test_double_backward_raises():
    z1, z2 = views(5, 3, torch.float64)
    loss = info_nce_fused(z1, z2, 0.5)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, [z1], create_graph=True)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU allocations, read from the profiler")
def test_nothing_of_the_n_by_n_matrix_is_held():
    # Forward and backward of N = 512, d = 16 in float32: allocations peak at a few N×d tensors (the unit
    # rows, the gradients) and vectors of N, never anything of N² = 1 MiB.
    n, d = 512, 16
    z1, z2 = views(n, d)

    def step():
        loss = info_nce_fused(z1, z2, 0.1, symmetric=True)
        return torch.autograd.grad(loss, [z1, z2])

    peak, _ = peak_allocated_bytes(step)
    assert 0 < peak <= 6 * n * d * 4 + 64 * n * 4 < n * n * 4


def test_fused_only_for_bfloat16_cuda_embeddings():
    # (what info_nce and supcon_loss ask before taking the fused ops)
    z = torch.randn(4, 8, device=DEVICE)
    assert not fused_fits(z, "auto")  # float32
    assert not fused_fits(z.bfloat16(), "reference")
    assert not fused_fits(torch.randn(4, 300, device=DEVICE).bfloat16(), "auto")  # d > 256
    bf16_tensor_cores = DEVICE == "cuda" and torch.cuda.get_device_capability() >= (8, 0)
    assert fused_fits(z.bfloat16(), "auto") == bf16_tensor_cores


@pytest.mark.skipif(DEVICE != "cuda", reason="the routing runs on CUDA tensors")
def test_info_nce_takes_the_fused_op_for_bfloat16_on_a_gpu():
    from llkern.functional import info_nce

    z1, z2 = views(300, 64, torch.bfloat16)
    loss = info_nce(z1, z2, 0.1, symmetric=True)
    assert torch.equal(loss, info_nce_fused(z1, z2, 0.1, symmetric=True))
    assert "info_nce_fused" in type(loss.grad_fn).__name__


BAD = [
    (lambda a, b: (a.half(), b.half()), TypeError, "bfloat16, float32 or float64"),
    (lambda a, b: (a.int(), b.int()), TypeError, "z1"),
    (lambda a, b: (a, b[:3]), ValueError, "same shape"),
    (lambda a, b: (a[:0], b[:0]), ValueError, "non-empty"),
    (lambda a, b: (a[0], b[0]), ValueError, "z1"),
    (lambda a, b: (torch.randn(4, 257, device=DEVICE), torch.randn(4, 257, device=DEVICE)), ValueError, "256"),
    (lambda a, b: (a, b.double()), ValueError, "one dtype"),
]


@pytest.mark.parametrize("mutate,error,match", BAD)
def test_bad_input(mutate, error, match):
    z1, z2 = (z.detach() for z in views(4, 6))
    with pytest.raises(error, match=match):
        info_nce_fused(*mutate(z1, z2), 0.1)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(temperature):
    z1, z2 = (z.detach() for z in views(4, 6))
    with pytest.raises(ValueError, match="temperature"):
        info_nce_fused(z1, z2, temperature)
