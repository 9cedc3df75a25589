"""batch_norm_relu / batch_norm_relu_backward: values and gradients against float64 BatchNorm + ReLU,
layouts, odd sizes, gradcheck, opcheck, compile, bad input."""

import pytest
import torch
import torch.nn.functional as F

from llkern._ext import kernel_available
from llkern.ops.batch_norm_relu import compute_dtype

from .conftest import DEVICES

pytestmark = pytest.mark.skipif(not kernel_available("batch_norm_relu", "cpu"), reason="llkern._C not built")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (N, C, *spatial): a channel of one, odd channel counts, a spatial size of 1, 2-D and 5-D inputs.
SHAPES = [(2, 1, 7), (3, 7, 5, 5), (4, 97, 1, 1), (2, 3, 1025), (5, 6), (2, 3, 2, 3, 5)]


def stats(x: torch.Tensor, training: bool, eps: float = 1e-5):
    """The mean and invstd the op takes: the batch's (biased variance) or fixed running ones."""
    compute = compute_dtype(x.dtype)
    dims = [0, *list(range(2, x.dim()))]
    if training:
        xc = x.detach().to(compute)
        return xc.mean(dims), torch.rsqrt(xc.var(dims, unbiased=False) + eps)
    channels = x.shape[1]
    return (torch.linspace(-0.3, 0.4, channels, device=x.device, dtype=compute),
            torch.linspace(0.5, 2.0, channels, device=x.device, dtype=compute))


def reference64(x, weight, bias, mean, invstd, training, grad):
    """relu(BN(x)) and its gradients in float64 through plain autograd (batch statistics differentiated)."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_() if weight is not None else None
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    shape = [1, -1] + [1] * (x.dim() - 2)
    if training:
        dims = [0, *list(range(2, x.dim()))]
        mu = x64.mean(dims, keepdim=True)
        xhat = (x64 - mu) * torch.rsqrt(x64.var(dims, unbiased=False, keepdim=True) + 1e-5)
    else:
        xhat = (x64 - mean.double().view(shape)) * invstd.double().view(shape)
    z = xhat
    if w64 is not None:
        z = z * w64.view(shape)
    if b64 is not None:
        z = z + b64.view(shape)
    y = torch.relu(z)
    inputs = [t for t in (x64, w64, b64) if t is not None]
    grads = torch.autograd.grad(y, inputs, grad.double())
    return y.detach(), grads


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def tolerance(dtype):
    return {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_matches_float64_reference(device, dtype, shape, training):
    x = (torch.randn(shape, device=device) * 2 + 0.3).to(dtype).requires_grad_()
    channels = shape[1]
    weight = (torch.rand(channels, device=device) + 0.5).to(compute_dtype(dtype)).requires_grad_()
    bias = torch.randn(channels, device=device).to(compute_dtype(dtype)).requires_grad_()
    mean, invstd = stats(x, training)
    y = torch.ops.llkern.batch_norm_relu(x, weight, bias, mean, invstd, training)
    grad = torch.randn(shape, device=device).to(dtype)
    grads = torch.autograd.grad(y, (x, weight, bias), grad)
    y64, grads64 = reference64(x, weight, bias, mean, invstd, training, grad)
    assert y.dtype == dtype and y.shape == x.shape
    tol = tolerance(dtype)
    assert rel_err(y, y64) < tol
    for name, g, r in zip(("input", "weight", "bias"), grads, grads64, strict=True):
        assert g.dtype == (dtype if name == "input" else weight.dtype)
        # Near the kink a rounding of z can flip the mask for 16-bit inputs: compare by relative error.
        assert rel_err(g, r) < (tol if dtype in (torch.float64, torch.float32) else 10 * tol), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_equals_pytorch_ops_bitwise(device, dtype):
    # The recomputation contract: z = x * scale + shift with two roundings, exactly as the pure-PyTorch path.
    x = torch.randn(4, 9, 6, 7, device=device).to(dtype)
    compute = compute_dtype(dtype)
    weight, bias = torch.randn(9, device=device, dtype=compute), torch.randn(9, device=device, dtype=compute)
    mean, invstd = stats(x, True)
    scale = weight * invstd
    shift = -mean * scale + bias
    expected = (x * scale.view(1, -1, 1, 1)).add_(shift.view(1, -1, 1, 1)).relu_().to(dtype)
    y = torch.ops.llkern.batch_norm_relu(x, weight, bias, mean, invstd, True)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "sliced", "transposed"])
def test_layouts(device, layout):
    if layout == "channels_last_3d":
        x = torch.randn(3, 5, 2, 4, 6, device=device).to(memory_format=torch.channels_last_3d)
    elif layout == "channels_last":
        x = torch.randn(3, 5, 4, 6, device=device).to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(3, 10, 4, 12, device=device)[:, ::2, :, 3:9]
    else:
        x = torch.randn(3, 4, 6, 5, device=device).transpose(1, 3)
    x = x.detach().requires_grad_()
    channels = x.shape[1]
    weight, bias = torch.rand(channels, device=device) + 0.5, torch.randn(channels, device=device)
    weight.requires_grad_()
    bias.requires_grad_()
    mean, invstd = stats(x, True)
    y = torch.ops.llkern.batch_norm_relu(x, weight, bias, mean, invstd, True)
    if layout.startswith("channels_last"):
        assert y.stride() == x.stride()  # the layout is kept, and the kernel reads it directly
    grad = torch.randn(x.shape, device=device)
    grads = torch.autograd.grad(y, (x, weight, bias), grad)
    y64, grads64 = reference64(x, weight, bias, mean, invstd, True, grad)
    assert rel_err(y, y64) < 2e-5
    for g, r in zip(grads, grads64, strict=True):
        assert rel_err(g, r) < 2e-5


@pytest.mark.parametrize("device", DEVICES)
def test_without_weight_and_bias_and_without_input_grad(device):
    x = torch.randn(4, 3, 5, 5, device=device)
    mean, invstd = stats(x, True)
    grad = torch.randn_like(x)
    gx, gw, gb = torch.ops.llkern.batch_norm_relu_backward(grad, x, None, None, mean, invstd, True, True)
    _, (gx64,) = reference64(x, None, None, mean, invstd, True, grad)
    assert gw.numel() == 0 and gb.numel() == 0 and rel_err(gx, gx64) < 2e-5
    weight, bias = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    gx, gw, gb = torch.ops.llkern.batch_norm_relu_backward(grad, x, weight, bias, mean, invstd, True, False)
    _, (_, gw64, gb64) = reference64(x, weight, bias, mean, invstd, True, grad)
    assert gx.numel() == 0 and rel_err(gw, gw64) < 2e-5 and rel_err(gb, gb64) < 2e-5


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_infinite_gradient(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    x[0, 0, 0, 0] = float("nan")
    mean, invstd = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = torch.ops.llkern.batch_norm_relu(x, None, None, mean, invstd, False)
    assert torch.isnan(y[0, 0, 0, 0]) and torch.equal(y[1], torch.relu(x[1]))  # NaN passes, as torch.relu
    grad = torch.randn_like(x)
    grad[x <= 0] = float("inf")  # masked out: exactly zero, never inf * 0
    gx, _, _ = torch.ops.llkern.batch_norm_relu_backward(grad, x, None, None, mean, invstd, False, True)
    expected = torch.where(x <= 0, 0.0, grad)
    assert torch.equal(gx.nan_to_num(), expected.nan_to_num())


def test_gradcheck():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, weight, bias):
        # The batch statistics are inputs' functions in the reference; the op folds their gradient into input's.
        with torch.no_grad():
            mean, invstd = x.mean((0, 2)), torch.rsqrt(x.var((0, 2), unbiased=False) + 1e-5)
        return torch.ops.llkern.batch_norm_relu(x, weight, bias, mean, invstd, True)

    def g(x, weight, bias):
        return torch.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5))

    # gradcheck perturbs x, so the statistics must move with it: compare the op's analytic Jacobian with
    # the reference's (whose batch statistics are differentiated) instead.
    inputs = (x, weight, bias)
    jac_op = torch.autograd.functional.jacobian(f, inputs)
    jac_ref = torch.autograd.functional.jacobian(g, inputs)
    for a, b in zip(jac_op, jac_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # In eval mode the statistics are constants and gradcheck applies directly.
    mean, invstd = torch.randn(4, dtype=torch.float64) * 0.1, torch.rand(4, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, w, b: torch.ops.llkern.batch_norm_relu(x, w, b, mean, invstd, False), inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(device, dtype, channels_last):
    x = torch.randn(3, 5, 4, 4, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    compute = compute_dtype(dtype)
    weight = torch.rand(5, device=device, dtype=compute, requires_grad=True)
    bias = torch.randn(5, device=device, dtype=compute, requires_grad=True)
    mean, invstd = stats(x, True)
    torch.library.opcheck(torch.ops.llkern.batch_norm_relu.default,
                          (x.requires_grad_(), weight, bias, mean, invstd, True))
    grad = torch.randn(x.shape, device=device, dtype=dtype)
    for input_grad in (True, False):
        torch.library.opcheck(torch.ops.llkern.batch_norm_relu_backward.default,
                              (grad, x.detach(), weight.detach(), None, mean, invstd, True, input_grad))


def test_torch_compile():
    def f(x, weight, bias):
        with torch.no_grad():
            mean, invstd = x.mean((0, 2, 3)), torch.rsqrt(x.var((0, 2, 3), unbiased=False) + 1e-5)
        return torch.ops.llkern.batch_norm_relu(x, weight, bias, mean, invstd, True).square().sum()

    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    weight, bias = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(x, weight, bias)
    grads = torch.autograd.grad(loss, (x, weight, bias))
    ref = torch.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)).square().sum()
    ref_grads = torch.autograd.grad(ref, (x, weight, bias))
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_bad_input():
    x = torch.randn(2, 3, 4)
    mean, invstd = torch.zeros(3), torch.ones(3)
    op = torch.ops.llkern.batch_norm_relu
    with pytest.raises(TypeError, match="input to be float32"):
        op(x.long(), None, None, mean, invstd, True)
    with pytest.raises(ValueError, match="shape \\(N, C, \\*\\)"):
        op(torch.randn(3), None, None, mean, invstd, True)
    with pytest.raises(ValueError, match="non-empty"):
        op(torch.randn(0, 3, 4), None, None, mean, invstd, True)
    with pytest.raises(ValueError, match="expected mean of shape \\[3\\]"):
        op(x, None, None, torch.zeros(4), invstd, True)
    with pytest.raises(TypeError, match="expected invstd to be Float"):
        op(x, None, None, mean, invstd.double(), True)
    with pytest.raises(ValueError, match="expected weight of shape \\[3\\]"):
        op(x, torch.ones(2), None, mean, invstd, True)
    with pytest.raises(TypeError, match="expected bias to be"):
        op(x, None, torch.ones(3, dtype=torch.float64), mean, invstd, True)
    backward = torch.ops.llkern.batch_norm_relu_backward
    with pytest.raises(ValueError, match="expected grad of the shape of input"):
        backward(torch.randn(2, 3, 5), x, None, None, mean, invstd, True)
    with pytest.raises(TypeError, match="expected grad to have the dtype of input"):
        backward(x.double(), x, None, None, mean, invstd, True)


def test_bad_input_refused_by_the_fake_implementation():
    # Meta tensors (and torch.compile's fake tensors) run the Python fake: it refuses what the C++ op refuses.
    x = torch.randn(2, 3, 4, device="meta")
    mean, invstd = torch.zeros(3, device="meta"), torch.ones(3, device="meta")
    op, backward = torch.ops.llkern.batch_norm_relu, torch.ops.llkern.batch_norm_relu_backward
    assert op(x, None, None, mean, invstd, True).shape == x.shape
    with pytest.raises(TypeError, match="input to be float32"):
        op(x.long(), None, None, mean, invstd, True)
    with pytest.raises(ValueError, match="expected mean of shape \\[3\\]"):
        op(x, None, None, torch.zeros(4, device="meta"), invstd, True)
    with pytest.raises(TypeError, match=r"expected invstd to be torch\.float32"):
        op(x, None, None, mean, invstd.double(), True)
    with pytest.raises(ValueError, match="expected grad of the shape of input"):
        backward(torch.randn(2, 3, 5, device="meta"), x, None, None, mean, invstd, True)
    with pytest.raises(TypeError, match="expected grad to have the dtype of input"):
        backward(x.double(), x, None, None, mean, invstd, True)
    compiled = torch.compile(lambda x, mean: op(x, None, None, mean, invstd.to("cpu"), True), backend="eager")
    with pytest.raises(Exception, match="expected mean of shape \\[3\\]"):
        compiled(torch.randn(2, 3, 4), torch.zeros(5))


def test_statistics_requiring_grad_are_refused():
    x = torch.randn(2, 3, 4, requires_grad=True)
    mean, invstd = torch.zeros(3, requires_grad=True), torch.ones(3)
    y = torch.ops.llkern.batch_norm_relu(x, None, None, mean, invstd, True)
    with pytest.raises(RuntimeError, match="mean and invstd are constants"):
        y.sum().backward()
