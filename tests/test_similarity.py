"""Similarity-matrix loss ops (InfoNCE, supervised contrastive, Rényi-2 MI): values and gradients
against the float64 references, gradcheck, opcheck, torch.compile, edge cases, bad input."""

import os
import subprocess
import sys

import pytest
import torch

from llkern._ext import kernel_available
from llkern.ops.similarity import info_nce, renyi_mutual_information, supcon_loss
from llkern.reference.similarity import info_nce_reference, renyi_mutual_information_reference, supcon_reference

# (not imported from conftest: a test below imports this file as a plain module in a subprocess)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

pytestmark = pytest.mark.skipif(not kernel_available("info_nce", "cpu"), reason="llkern._C not built")

SIZES = [(1, 3), (7, 1), (7, 3), (97, 129), (1025, 3)]
OPS = ("info_nce", "info_nce_symmetric", "supcon", "renyi")


def make(n, d, dtype=torch.float32, classes=5):
    z1 = torch.randn(n, d, dtype=dtype)
    z2 = (z1.float() + 0.5 * torch.randn(n, d)).to(dtype)  # correlated views: a loss that is not all noise
    labels = torch.randint(0, classes, (n,))
    return z1, z2, labels


def sigma_for(z):
    # a width on the scale of the distances, so that the Gram matrix is neither all 0 nor all 1
    return float((2.0 * z.shape[1]) ** 0.5)


def run(op, z1, z2, labels, impl, **kw):
    """The op's loss and its gradients with respect to z1 (and z2 for InfoNCE)."""
    z1 = z1.detach().requires_grad_()
    z2 = z2.detach().requires_grad_()
    if op.startswith("info_nce"):
        loss = info_nce(z1, z2, kw.get("temperature", 0.1), symmetric=op.endswith("symmetric"),
                        normalize=kw.get("normalize", True), impl=impl)
        inputs = (z1, z2)
    elif op == "supcon":
        loss = supcon_loss(z1, labels, kw.get("temperature", 0.1), normalize=kw.get("normalize", True), impl=impl)
        inputs = (z1,)
    else:
        loss = renyi_mutual_information(z1, labels, sigma=kw.get("sigma", sigma_for(z1)),
                                        label_sigma=kw.get("label_sigma"), impl=impl)
        inputs = (z1,)
    return loss, torch.autograd.grad(loss, inputs)


def reference(op, z1, z2, labels, **kw):
    z1 = z1.detach().double().requires_grad_()
    z2 = z2.detach().double().requires_grad_()
    if op.startswith("info_nce"):
        loss = info_nce_reference(z1, z2, kw.get("temperature", 0.1), symmetric=op.endswith("symmetric"),
                                  normalize=kw.get("normalize", True))
        inputs = (z1, z2)
    elif op == "supcon":
        loss = supcon_reference(z1, labels, kw.get("temperature", 0.1), normalize=kw.get("normalize", True))
        inputs = (z1,)
    else:
        loss = renyi_mutual_information_reference(z1, labels, sigma=kw.get("sigma", sigma_for(z1)),
                                                  label_sigma=kw.get("label_sigma"))
        inputs = (z1,)
    return loss, torch.autograd.grad(loss, inputs)


def relative_error(a, b, floor=1e-12):
    # relative to the largest entry; gradients that are zero in exact arithmetic are judged
    # against `floor` instead of the reference's rounding noise
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def assert_matches(op, z1, z2, labels, tol, **kw):
    loss, grads = run(op, z1, z2, labels, "kernel", **kw)
    ref_loss, ref_grads = reference(op, z1, z2, labels, **kw)
    assert loss.dtype == (torch.float64 if z1.dtype == torch.float64 else torch.float32)
    assert abs(loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item())), (loss.item(), ref_loss.item())
    # With d = 1, unit rows are ±1 and the gradient through the normalisation is exactly zero:
    # there both sides are rounding noise, judged against a floor of 1e-3.
    floor = 1e-3 if z1.shape[1] == 1 and kw.get("normalize", True) and op != "renyi" else 1e-12
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == z1.dtype and g.shape == r.shape
        assert relative_error(g, r, floor) <= tol, relative_error(g, r, floor)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n,d", SIZES)
def test_float64_matches_reference(op, n, d):
    z1, z2, labels = make(n, d, torch.float64)
    assert_matches(op, z1, z2, labels, 1e-10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n,d", SIZES)
def test_float32_matches_reference(op, n, d):
    z1, z2, labels = make(n, d)
    assert_matches(op, z1, z2, labels, 2e-5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_computed_in_float32(op, dtype):
    # The 16-bit inputs are widened and everything runs in float32: against float64 on the same
    # (rounded) inputs the loss is float32-accurate, the gradients are rounded to the input dtype.
    z1, z2, labels = make(97, 33, dtype)
    loss, grads = run(op, z1, z2, labels, "kernel")
    ref_loss, ref_grads = reference(op, z1, z2, labels)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    eps = torch.finfo(dtype).eps
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert relative_error(g, r) <= 2 * eps


@pytest.mark.parametrize("op", OPS)
def test_without_normalize_and_other_widths(op):
    z1, z2, labels = make(40, 6, torch.float64)
    if op == "renyi":
        for label_sigma in (0.5, 2.0):
            assert_matches(op, z1, z2, labels, 1e-10, label_sigma=label_sigma, sigma=1.3)
        assert_matches(op, z1, z2, labels, 1e-10, sigma=None)  # Silverman's rule in the kernel
    else:
        z1, z2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
        assert_matches(op, z1, z2, labels, 1e-10, normalize=False, temperature=0.5)


@pytest.mark.parametrize("op", OPS)
def test_non_contiguous_inputs(op):
    z1, z2, labels = make(64, 20, torch.float64)
    wide1, wide2 = torch.randn(20, 128, dtype=torch.float64), torch.randn(20, 128, dtype=torch.float64)
    z1, z2 = wide1.t()[::2], wide2.t()[1::2]  # transposed and strided views
    assert not z1.is_contiguous() and z1.shape == (64, 20)
    assert_matches(op, z1, z2, labels, 1e-10)


def test_small_temperature_is_stable():
    # unit vectors at τ = 0.01: logits in [-100, 100]
    z1, z2, labels = make(257, 16)
    for op in ("info_nce", "info_nce_symmetric", "supcon"):
        loss, grads = run(op, z1, z2, labels, "kernel", temperature=0.01)
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        assert_matches(op, z1, z2, labels, 1e-4, temperature=0.01)


def test_large_batch_spans_several_blocks():
    # more rows than one block holds (2^21 values / N rows per block): the block loop and the
    # running column statistics are exercised
    z1, z2, labels = make(2500, 4)
    for op in OPS:
        assert_matches(op, z1, z2, labels, 5e-5)


def test_renyi_with_a_large_common_offset():
    # distances from |t_i|² + |t_j|² − 2 t_i·t_j would cancel a large shared offset away in
    # float32; the kernel centres the rows first. Judged against float64 on the same inputs.
    z1, _, labels = make(60, 8)
    for offset in (1e3, 2e6):
        shifted = z1 + offset
        loss, (g,) = run("renyi", shifted, shifted, labels, "kernel", sigma=4.0 * (1 + offset / 1e4))
        ref, (r,) = reference("renyi", shifted, shifted, labels, sigma=4.0 * (1 + offset / 1e4))
        assert abs(loss.item() - ref.item()) < 1e-4 * max(1.0, abs(ref.item())), (offset, loss.item(), ref.item())
        assert relative_error(g, r) < 1e-3


def test_upstream_gradient_scales_and_recompute_path():
    z1, z2, labels = make(33, 8, torch.float64)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    (3.0 * info_nce(a1, a2, 0.2, symmetric=True, impl="kernel")).backward()
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    (3.0 * info_nce_reference(b1, b2, 0.2, symmetric=True)).backward()
    torch.testing.assert_close(a1.grad, b1.grad)
    torch.testing.assert_close(a2.grad, b2.grad)
    # The op called without with_grad while inputs need gradients: the backward recomputes.
    for args, ref in [
        ((torch.ops.llkern.info_nce, (0.2, False, True, False)), lambda x: info_nce_reference(x, z2, 0.2)),
        ((torch.ops.llkern.supcon_loss, (labels, 0.2, True, False)), lambda x: supcon_reference(x, labels, 0.2)),
        ((torch.ops.llkern.renyi_mutual_information, (labels, 2.0, None, False)),
         lambda x: renyi_mutual_information_reference(x, labels, sigma=2.0)),
    ]:
        op, rest = args
        x = z1.clone().requires_grad_()
        out = op(x, z2, *rest) if op is torch.ops.llkern.info_nce else op(x, *rest)
        assert out[1].numel() == 0  # no gradient formed in the forward
        (2.0 * out[0]).backward()
        y = z1.clone().requires_grad_()
        (2.0 * ref(y)).backward()
        torch.testing.assert_close(x.grad, y.grad)


def test_no_grad_forms_no_gradient():
    z1, z2, _ = make(16, 4)
    z1.requires_grad_()
    with torch.no_grad():
        loss = info_nce(z1, z2, impl="kernel")
    assert loss.grad_fn is None
    assert torch.ops.llkern.info_nce(z1.detach(), z2, 0.1, False, True, False)[1].numel() == 0


def test_edge_cases():
    # N = 1: every loss is 0 with zero gradients
    for op in OPS:
        z1, z2, labels = make(1, 5)
        loss, grads = run(op, z1, z2, labels, "kernel")
        assert loss.item() == 0.0 and all((g == 0).all() for g in grads)
    # anchors without positives contribute nothing; all-distinct labels give 0 and zero gradients
    z = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 3, 3])
    assert_matches("supcon", z, z, labels, 1e-10)
    loss, (g,) = run("supcon", z, z, torch.arange(6), "kernel")
    assert loss.item() == 0.0 and (g == 0).all()
    # duplicated rows are ordinary rows
    z = torch.randn(5, 3, dtype=torch.float64)
    z = torch.cat([z, z[:2]])
    labels = torch.tensor([0, 1, 2, 0, 1, 0, 1])
    for op in OPS:
        assert_matches(op, z, z.flip(0), labels, 1e-10)
    # identical views and orthogonal one-hot rows: InfoNCE is log N - 1/τ + log(1 + ...) exactly
    eye = torch.eye(4, dtype=torch.float64)
    loss, _ = run("info_nce", eye, eye, labels[:4], "kernel", temperature=1.0)
    expected = torch.log(torch.tensor(torch.e + 3.0, dtype=torch.float64)) - 1.0
    assert abs(loss.item() - expected.item()) < 1e-12


def test_gradcheck_float64():
    z1, z2, labels = make(6, 3, torch.float64)
    z1.requires_grad_()
    z2.requires_grad_()
    for symmetric in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, s=symmetric: info_nce(a, b, 0.3, symmetric=s, impl="kernel"), (z1, z2))
    assert torch.autograd.gradcheck(lambda a: supcon_loss(a, labels, 0.3, impl="kernel"), (z1,))
    assert torch.autograd.gradcheck(lambda a: renyi_mutual_information(a, labels, sigma=1.5, label_sigma=0.8,
                                                                       impl="kernel"), (z1,))


def test_opcheck():
    z1, z2, labels = make(9, 4)
    for with_grad in (False, True):
        torch.library.opcheck(torch.ops.llkern.info_nce.default, (z1, z2, 0.1, False, True, with_grad))
        torch.library.opcheck(torch.ops.llkern.info_nce.default, (z1, z2, 0.1, True, False, with_grad))
        torch.library.opcheck(torch.ops.llkern.supcon_loss.default, (z1, labels, 0.1, True, with_grad))
        torch.library.opcheck(torch.ops.llkern.renyi_mutual_information.default,
                              (z1, labels, 2.0, None, with_grad))
        torch.library.opcheck(torch.ops.llkern.renyi_mutual_information.default,
                              (z1, labels, None, 0.5, with_grad))


def test_torch_compile_fullgraph():
    z1, z2, labels = make(20, 6)

    def f(a, b, y):
        return (info_nce(a, b, 0.1, symmetric=True, impl="kernel") + supcon_loss(a, y, 0.1, impl="kernel")
                - renyi_mutual_information(b, y, sigma=3.0, impl="kernel"))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a1, b1 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    a2, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    out, expected = compiled(a1, b1, labels), f(a2, b2, labels)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out, [a1, b1]), torch.autograd.grad(expected, [a2, b2]))


def test_baseline_isa_path_matches_reference():
    # The float passes have AVX2+FMA copies chosen at run time; LLKERN_CPU_BASELINE=1 forces the
    # baseline ones in a fresh process (the choice is made once per process).
    script = (
        "import torch, sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_similarity import make, assert_matches, OPS\n"
        "torch.manual_seed(0)\n"
        "for n, d in [(7, 3), (97, 33), (1500, 5)]:\n"
        "    z1, z2, labels = make(n, d)\n"
        "    for op in OPS:\n"
        "        assert_matches(op, z1, z2, labels, 2e-5)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, LLKERN_CPU_BASELINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_bad_input(impl):
    z = torch.randn(5, 3)
    labels = torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="same shape"):
        info_nce(z, torch.randn(6, 3), impl=impl)
    with pytest.raises(ValueError, match="d >= 1"):
        info_nce(torch.randn(5, 0), torch.randn(5, 0), impl=impl)
    with pytest.raises(ValueError, match="non-empty"):
        supcon_loss(torch.randn(0, 3), labels[:0], impl=impl)
    with pytest.raises(TypeError, match="integer labels"):
        supcon_loss(z, labels.float(), impl=impl)
    with pytest.raises(ValueError, match="labels of shape"):
        renyi_mutual_information(z, labels[:4], impl=impl)
    with pytest.raises(ValueError, match="NaN or infinite"):
        info_nce(z, torch.full((5, 3), float("nan")), impl=impl)
    with pytest.raises(ValueError, match="NaN or infinite"):
        renyi_mutual_information(torch.full((5, 3), float("inf")), labels, impl=impl)
    with pytest.raises(ValueError, match="temperature"):
        supcon_loss(z, labels, 0.0, impl=impl)
    with pytest.raises(ValueError, match="sigma"):
        renyi_mutual_information(z, labels, sigma=-1.0, impl=impl)
    with pytest.raises(TypeError, match="floating-point"):
        info_nce(z.long(), z.long(), impl=impl)
    with pytest.raises(ValueError, match="one device with one dtype"):
        info_nce(z, z.double(), impl=impl)


def test_op_rejects_bad_input_directly():
    # the C++ op checks on its own (callers may skip the Python wrapper)
    z = torch.randn(5, 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        torch.ops.llkern.supcon_loss(torch.full((5, 3), float("nan")), torch.zeros(5, dtype=torch.long), 0.1, True)
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.llkern.info_nce(z, z, -1.0, False, True)
    with pytest.raises(ValueError, match="one shape and dtype"):
        torch.ops.llkern.info_nce(z, z[:4], 0.1, False, True)
    with pytest.raises(ValueError, match="labels of shape"):
        torch.ops.llkern.renyi_mutual_information(z, torch.zeros(4, dtype=torch.long), None, None)
    with pytest.raises(TypeError, match="integer labels"):
        torch.ops.llkern.supcon_loss(z, torch.zeros(5), 0.1, True)


def test_memory_stays_linear_in_n():
    # N = 8192: one N×N fp32 matrix is 256 MiB, the rows 0.5 MiB. Peak resident memory over the
    # forward + backward of each loss, in a fresh process (Linux VmHWM reset after set-up), must
    # stay far below one matrix: the ops hold one 8 MiB block (two for Rényi), never the matrix.
    script = (
        "import torch, llkern\n"
        "def status(field):\n"
        "    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field))\n"
        "n, d = 8192, 16\n"
        "a, b = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)\n"
        "y = torch.randint(0, 10, (n,))\n"
        "F = llkern.functional\n"
        "steps = [lambda: F.info_nce(a, b, impl='kernel'),\n"
        "         lambda: F.info_nce(a, b, symmetric=True, impl='kernel'),\n"
        "         lambda: F.supcon_loss(a, y, impl='kernel'),\n"
        "         lambda: F.renyi_mutual_information(a, y, impl='kernel')]\n"
        "steps[0]().backward()  # warm up: thread pools, BLAS buffers\n"
        "for step in steps:\n"
        "    a.grad = b.grad = None\n"
        "    open('/proc/self/clear_refs', 'w').write('5')\n"
        "    base = status('VmRSS:')\n"
        "    step().backward()\n"
        "    print((status('VmHWM:') - base) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    extra_mib = [float(v) for v in out.stdout.split()]
    assert len(extra_mib) == 4 and max(extra_mib) < 48, extra_mib


CUDA = torch.cuda.is_available() and kernel_available("info_nce", "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA kernels and a GPU")
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_reference(op):
    for n, d, dtype in [(1, 3, torch.float32), (7, 3, torch.float64), (97, 129, torch.float32),
                        (1025, 3, torch.bfloat16), (3000, 16, torch.float32)]:
        z1, z2, labels = (t.cuda() for t in make(n, d, dtype))
        tol = 1e-10 if dtype == torch.float64 else (2 * torch.finfo(dtype).eps if dtype == torch.bfloat16 else 2e-5)
        if dtype == torch.float32:
            # or 4x PyTorch's own float32 error on the GPU (the reference run in float32 there): cuBLAS's
            # float32 products round differently from the CPU's, by up to ~2e-5 at N = 3000
            _, torch_grads = run(op, z1, z2, labels, "reference")
            _, ref_grads = reference(op, z1, z2, labels)
            tol = max(tol, 4 * max(relative_error(g, r) for g, r in zip(torch_grads, ref_grads, strict=True)))
        assert_matches(op, z1, z2, labels, tol)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA kernels and a GPU")
def test_cuda_opcheck():
    z1, z2, labels = (t.cuda() for t in make(9, 4))
    for with_grad in (False, True):
        torch.library.opcheck(torch.ops.llkern.info_nce.default, (z1, z2, 0.1, True, True, with_grad))
        torch.library.opcheck(torch.ops.llkern.supcon_loss.default, (z1, labels, 0.1, True, with_grad))
        torch.library.opcheck(torch.ops.llkern.renyi_mutual_information.default, (z1, labels, None, 0.5, with_grad))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises_instead_of_returning_zeros(op, device):
    # The kernels' gradients are constants to autograd: a gradient penalty through them would be silently
    # dropped (it once was). The kernel path refuses create_graph=True; the reference path supports it.
    z1, z2, labels = (t.to(device) for t in make(7, 3, torch.float64))
    for impl in ("kernel", "reference"):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        if op.startswith("info_nce"):
            loss = info_nce(a, b, 0.3, symmetric=op.endswith("symmetric"), impl=impl)
        elif op == "supcon":
            loss = supcon_loss(a, labels, 0.3, impl=impl)
        else:
            loss = renyi_mutual_information(a, labels, sigma=sigma_for(a), impl=impl)
        if impl == "kernel":
            with pytest.raises(NotImplementedError, match="double backward"):
                torch.autograd.grad(loss, a, create_graph=True)
        else:
            (g,) = torch.autograd.grad(loss, a, create_graph=True)
            (gg,) = torch.autograd.grad(g.square().sum(), a)
            assert gg.abs().max() > 0


@pytest.mark.parametrize("op", OPS)
def test_bit_identical_from_run_to_run(op):
    # docs/ops.md: at one thread count the losses and gradients repeat bit for bit (between thread counts
    # MKL's products may differ in the last bits)
    z1, z2, labels = make(301, 17)
    first, again = run(op, z1, z2, labels, "kernel"), run(op, z1, z2, labels, "kernel")
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], again[1], strict=True))
