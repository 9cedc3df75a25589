"""Transport penalty op: values and gradients against float64, opcheck, compile, bad input."""

import pytest
import torch

import llkern
from llkern._ext import kernel_available
from llkern.reference.transport import transport_penalty_reference

from .conftest import DEVICES

pytestmark = pytest.mark.skipif(not kernel_available("transport_penalty", "cpu"),
                                reason="llkern._C not built")

REDUCTIONS = ["mean", "sum_per_sample"]
ROW_SIZES = [1, 7, 97, 1025]


def reference64(y, x, tau, reduction):
    """Loss and gradients in float64 through plain autograd."""
    y64 = y.detach().double().requires_grad_()
    x64 = None if x is None else x.detach().double().requires_grad_()
    loss = transport_penalty_reference(y64, x64, tau, reduction)
    grads = torch.autograd.grad(loss, [t for t in (y64, x64) if t is not None])
    return loss.detach(), grads


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row", ROW_SIZES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_x", [True, False])
def test_matches_float64_reference(device, row, reduction, with_x):
    y = torch.randn(3, row, device=device, requires_grad=True)
    x = torch.randn(3, row, device=device, requires_grad=True) if with_x else None
    loss = llkern.transport_penalty(y, x, tau=0.37, reduction=reduction, impl="kernel")
    assert loss.dtype == torch.float32 and loss.shape == ()
    inputs = [t for t in (y, x) if t is not None]
    grads = torch.autograd.grad(loss, inputs)
    ref_loss, ref_grads = reference64(y, x, 0.37, reduction)
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=1e-6, atol=0)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double().cpu(), r.cpu(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [16383, 16384, 100_003, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_many_chunks(device, numel, dtype):
    # Sizes around and over the kernels' chunk sizes exercise the parallel / multi-block paths.
    y = torch.randn(numel, device=device).to(dtype).requires_grad_()
    x = torch.randn(numel, device=device).to(dtype)
    loss = llkern.transport_penalty(y, x, 2.0, impl="kernel")
    (dy,) = torch.autograd.grad(loss, y)
    ref_loss, (ref_dy, _) = reference64(y, x, 2.0, "mean")
    # float64 exact to rounding; otherwise fp32 accumulation, and dy rounded once to the dtype.
    loss_tol = 1e-12 if dtype == torch.float64 else 1e-5
    grad_tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=loss_tol, atol=0)
    # float16 gradients this small are subnormal: half a subnormal step (2^-25) is their rounding.
    atol = 2.0**-24 if dtype == torch.float16 else 1e-7 * ref_dy.abs().max().item()
    torch.testing.assert_close(dy.double().cpu(), ref_dy.cpu(), rtol=grad_tol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_x", [True, False])
def test_forward_writing_the_gradient(device, dtype, with_x):
    # The op's with_grad path (the CPU default; on CUDA its own kernel variants) on an odd size.
    y = torch.randn(3, 1025, device=device).to(dtype)
    x = torch.randn(3, 1025, device=device).to(dtype) if with_x else None
    loss, dy = torch.ops.llkern.transport_penalty(y, x, 0.8, "sum_per_sample", True)
    ref_loss, ref_grads = reference64(y, x, 0.8, "sum_per_sample")
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert dy.dtype == dtype and dy.shape == y.shape
    loss_tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=loss_tol, atol=0)
    torch.testing.assert_close(dy.double().cpu(), ref_grads[0].cpu(), rtol=tol, atol=1e-9)
    _, empty = torch.ops.llkern.transport_penalty(y, x, 0.8, "sum_per_sample", False)
    assert empty.numel() == 0


def test_double_backward_raises():
    y = torch.randn(4, 5, requires_grad=True)
    (dy,) = torch.autograd.grad(llkern.transport_penalty(y, impl="reference"), y, create_graph=True)
    assert dy.requires_grad  # the reference supports it
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(llkern.transport_penalty(y, impl="kernel"), y, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base_y = torch.randn(97, 64, device=device)
    base_x = torch.randn(64, 97, device=device)
    y = base_y[:, ::2].detach().requires_grad_()  # a strided leaf, so .grad is set
    y_view = y.t().t()
    x = base_x.t()[:, 1::2]  # transposed and strided
    assert not y_view.is_contiguous() and not x.is_contiguous()
    loss = llkern.transport_penalty(y_view, x, 1.5, "sum_per_sample", impl="kernel")
    loss.backward()
    ref_loss, (ref_dy, _) = reference64(y_view, x, 1.5, "sum_per_sample")
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=1e-6, atol=0)
    torch.testing.assert_close(y.grad.double().cpu(), ref_dy.cpu(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_x", [True, False])
def test_low_precision_error_relative_to_pytorch(device, dtype, with_x):
    # Judge 16-bit inputs by error against float64, relative to PyTorch's own error in that dtype.
    y = torch.randn(33, 1025, device=device).to(dtype).requires_grad_()
    x = torch.randn(33, 1025, device=device).to(dtype) if with_x else None
    loss = llkern.transport_penalty(y, x, 0.5, impl="kernel")
    assert loss.dtype == torch.float32
    (dy,) = torch.autograd.grad(loss, y)
    assert dy.dtype == dtype
    ref_loss, ref_grads = reference64(y, x, 0.5, "mean")
    # PyTorch eager in the same dtype.
    y_t = y.detach().clone().requires_grad_()
    r_t = y_t if x is None else y_t - x
    torch_loss = r_t.square().mean() / (2 * 0.5)
    (torch_dy,) = torch.autograd.grad(torch_loss, y_t)
    assert rel_err(loss, ref_loss.to(device)) <= max(2 * rel_err(torch_loss, ref_loss.to(device)), 1e-6)
    assert rel_err(dy, ref_grads[0].to(device)) <= 2 * rel_err(torch_dy, ref_grads[0].to(device)) + 1e-7


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_across_runs_and_threads(device):
    y = torch.randn(3_000_001, device=device)
    x = torch.randn(3_000_001, device=device)
    first = llkern.transport_penalty(y, x, impl="kernel")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = llkern.transport_penalty(y, x, impl="kernel")
    finally:
        torch.set_num_threads(threads)
    again = llkern.transport_penalty(y, x, impl="kernel")
    assert first.item() == single.item() == again.item()


def test_gradcheck_float64():
    y = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda a, b, r=reduction: llkern.transport_penalty(a, b, 0.3, r, impl="kernel"), (y, x))
        assert torch.autograd.gradcheck(
            lambda a, r=reduction: llkern.transport_penalty(a, None, 0.3, r, impl="kernel"), (y,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_x", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_opcheck(device, with_x, dtype):
    y = torch.randn(4, 9, dtype=dtype, device=device, requires_grad=True)
    x = torch.randn(4, 9, dtype=dtype, device=device, requires_grad=True) if with_x else None
    for reduction in REDUCTIONS:
        for with_grad in (False, True):
            torch.library.opcheck(torch.ops.llkern.transport_penalty.default, (y, x, 0.7, reduction, with_grad))
    grad = torch.rand((), dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    torch.library.opcheck(torch.ops.llkern.transport_penalty_backward.default,
                          (grad, y.detach(), None if x is None else x.detach(), 0.7, "mean"))


def test_torch_compile_fullgraph():
    def f(y, x):
        return llkern.transport_penalty(y, x, tau=0.5, impl="kernel") * 3.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = torch.randn(8, 33, requires_grad=True)
    x = torch.randn(8, 33)
    out = compiled(y, x)
    (dy,) = torch.autograd.grad(out, y)
    ref_loss, (ref_dy, _) = reference64(y, x, 0.5, "mean")
    torch.testing.assert_close(out.double(), 3.0 * ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(dy.double(), 3.0 * ref_dy, rtol=1e-6, atol=1e-12)


def test_torch_compile_inductor():
    compiled = torch.compile(lambda y: llkern.transport_penalty(y, None, 2.0, "sum_per_sample"), fullgraph=True)
    y = torch.randn(6, 5, requires_grad=True)
    out = compiled(y)
    out.backward()
    torch.testing.assert_close(out.double(), reference64(y, None, 2.0, "sum_per_sample")[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(y.grad, y.detach() / (2.0 * 6), rtol=1e-6, atol=1e-9)


def _profiled_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def test_no_gradient_work_when_not_needed():
    y, x = torch.randn(4, 5), torch.randn(4, 5)
    loss = llkern.transport_penalty(y, x, impl="kernel")
    assert not loss.requires_grad and loss.grad_fn is None
    y.requires_grad_()
    with torch.no_grad():
        assert llkern.transport_penalty(y, x, impl="kernel").grad_fn is None

    # Only y needs a gradient. On the CPU it is written by the forward pass: the backward runs
    # no kernel and no scaling when the upstream gradient is 1, and forms no dx.
    def step():
        llkern.transport_penalty(y, x, impl="kernel").backward()

    names = _profiled_ops(step)
    assert "llkern::transport_penalty_backward" not in names
    assert not {"aten::mul", "aten::neg"} & set(names)
    assert x.grad is None
    torch.testing.assert_close(y.grad, (y - x).detach() / y.numel())


def test_holds_one_buffer_until_backward():
    from llkern.local.memory import MemoryMeter

    leaf = torch.randn(1000, requires_grad=True)
    with MemoryMeter() as meter:
        h = leaf * 2.0  # saves nothing (a Python scalar)
        llkern.transport_penalty(h, impl="kernel").backward()
    assert meter.peak_saved_bytes == 4000  # the gradient buffer only; eager's square() saves h likewise


def test_scaled_and_retained_backward():
    y = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 9, dtype=torch.float64)
    loss = llkern.transport_penalty(y, x, 0.5, impl="kernel")
    (3.0 * loss).backward(retain_graph=True)
    expected = 3.0 * (y - x).detach() / (0.5 * y.numel())
    torch.testing.assert_close(y.grad, expected)
    loss.backward()  # the retained graph still holds the forward's gradient
    torch.testing.assert_close(y.grad, expected * 4.0 / 3.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_op_recomputes_the_gradient(device, reduction, dtype):
    # The path CUDA takes by default: the backward re-reads y and x, scaled by the upstream gradient.
    y = torch.randn(5, 97, device=device, dtype=dtype)
    x = torch.randn(5, 97, device=device, dtype=dtype)
    grad = torch.tensor(0.3, device=device, dtype=dtype)
    dy = torch.ops.llkern.transport_penalty_backward(grad, y, x, 1.7, reduction)
    _, (ref_dy, _) = reference64(y.requires_grad_(), x.requires_grad_(), 1.7, reduction)
    torch.testing.assert_close(dy.double().cpu(), 0.3 * ref_dy.cpu(), rtol=1e-6, atol=1e-12)
    dy_no_x = torch.ops.llkern.transport_penalty_backward(grad, y.detach(), None, 1.7, reduction)
    _, (ref_no_x,) = reference64(y, None, 1.7, reduction)
    torch.testing.assert_close(dy_no_x.double().cpu(), 0.3 * ref_no_x.cpu(), rtol=1e-6, atol=1e-12)


def test_gradient_of_x_is_minus_gradient_of_y():
    y = torch.randn(6, 11, requires_grad=True)
    x = torch.randn(6, 11, requires_grad=True)
    llkern.transport_penalty(y, x, 0.9).backward()
    torch.testing.assert_close(x.grad, -y.grad)


def test_reference_impl_matches_kernel():
    y = torch.randn(5, 13)
    x = torch.randn(5, 13)
    for reduction in REDUCTIONS:
        a = llkern.transport_penalty(y, x, 0.4, reduction, impl="kernel")
        b = llkern.transport_penalty(y, x, 0.4, reduction, impl="reference")
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


BAD_INPUTS = [
    (dict(y=torch.randn(2, 3), x=torch.randn(2, 4)), ValueError, "same shape"),
    (dict(y=torch.randint(0, 5, (2, 3))), TypeError, "expected y to be float32"),
    (dict(y=torch.randn(2, 3), x=torch.randn(2, 3, dtype=torch.float64)), TypeError, "dtype of y"),
    (dict(y=torch.randn(2, 3), x=torch.randn(2, 3, device="meta")), ValueError, "same device"),
    (dict(y=torch.randn(2, 3), tau=0.0), ValueError, "tau"),
    (dict(y=torch.randn(2, 3), tau=-1.0), ValueError, "tau"),
    (dict(y=torch.randn(2, 3), tau=float("nan")), ValueError, "tau"),
    (dict(y=torch.randn(2, 3), tau=float("inf")), ValueError, "tau"),
    (dict(y=torch.randn(2, 3), tau=True), ValueError, "tau"),
    (dict(y=torch.randn(0, 3)), ValueError, "non-empty"),
    (dict(y=torch.randn(2, 3), reduction="sum"), ValueError, "reduction"),
    (dict(y=torch.tensor(1.0), reduction="sum_per_sample"), ValueError, "batch dimension"),
    (dict(y=[1.0, 2.0]), TypeError, "expected y to be a Tensor"),
    (dict(y=torch.randn(2, 3), x="x"), TypeError, "expected x to be a Tensor"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_INPUTS)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_bad_input(kwargs, error, match, impl):
    with pytest.raises(error, match=match):
        llkern.transport_penalty(**kwargs, impl=impl)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 3), torch.randn(2, 4), 1.0, "mean"), "same shape"),
    ((torch.randint(0, 5, (2, 3)), None, 1.0, "mean"), "float32"),
    ((torch.randn(2, 3), None, -1.0, "mean"), "tau"),
    ((torch.randn(0, 3), None, 1.0, "mean"), "non-empty"),
    ((torch.randn(2, 3), None, 1.0, "bogus"), "reduction"),
    ((torch.randn(2, 3), torch.randn(2, 3).double(), 1.0, "mean"), "dtype"),
])
def test_bad_input_reaching_the_op_directly(args, match):
    # The C++ binding checks too: calling torch.ops directly raises, never crashes.
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        torch.ops.llkern.transport_penalty(*args)


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        llkern.transport_penalty(torch.randn(2, 2), impl="fast")


def test_auto_falls_back_with_one_warning(monkeypatch):
    import llkern._ext as ext

    monkeypatch.setattr(ext, "_warned", set())
    y = torch.randn(3, 4, device="meta")  # no kernel is built for the meta device
    with pytest.warns(UserWarning, match="pure-PyTorch reference"):
        out = llkern.transport_penalty(y)
    assert out.device.type == "meta"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llkern.transport_penalty(y)  # warned once only
    with pytest.raises(RuntimeError, match="pip install"):
        llkern.transport_penalty(y, impl="kernel")


def test_functional_and_module_forms():
    y, x = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(llkern.functional.transport_penalty(y, x, 0.5), transport_penalty_reference(y, x, 0.5))
    module = llkern.TransportPenalty(tau=0.5, reduction="sum_per_sample")
    torch.testing.assert_close(module(y, x), transport_penalty_reference(y, x, 0.5, "sum_per_sample"))
    torch.testing.assert_close(module(y), transport_penalty_reference(y, None, 0.5, "sum_per_sample"))
    assert "tau=0.5" in repr(module)
    with pytest.raises(ValueError, match="tau"):
        llkern.TransportPenalty(tau=0.0)
    with pytest.raises(ValueError, match="reduction"):
        llkern.TransportPenalty(reduction="sum")
