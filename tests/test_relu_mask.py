"""relu_with_mask / relu_mask_backward: values, mask bits and gradients against float64, layouts, tails,
gradcheck, opcheck, compile, bad input."""

import pytest
import torch

from llkern._ext import kernel_available
from llkern.ops.relu_mask import mask_bytes, relu_with_mask, relu_with_mask_reference

from .conftest import DEVICES

pytestmark = pytest.mark.skipif(not kernel_available("relu_with_mask", "cpu"), reason="llkern._C not built")

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 7, 8, 63, 64, 65, 97, 1025, 70_001]


def unpack(mask: torch.Tensor, numel: int) -> torch.Tensor:
    """The mask's bits as a bool vector, by plain integer arithmetic (independent of the kernels)."""
    bits = (mask.long().unsqueeze(1) >> torch.arange(8, device=mask.device)) & 1
    return bits.reshape(-1)[:numel].bool()


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's elements in memory order."""
    dims = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(dims).reshape(-1)


def special_values(x: torch.Tensor) -> torch.Tensor:
    """x with zeros of both signs, infinities and NaN planted at its start (where it is long enough)."""
    flat = x.view(-1) if x.is_contiguous() else x.reshape(-1)
    for i, v in enumerate([0.0, -0.0, float("inf"), -float("inf"), float("nan")][: flat.numel() - 1]):
        flat[i + 1] = v
    return flat.view(x.shape) if x.is_contiguous() else x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", SIZES)
def test_values_mask_and_gradient(device, dtype, numel):
    x = special_values(torch.randn(numel, device=device).to(dtype)).requires_grad_()
    y, mask = relu_with_mask(x, impl="kernel")
    x64 = x.detach().double().requires_grad_()
    y64 = torch.relu(x64)
    assert y.dtype == dtype and mask.dtype == torch.uint8 and mask.shape == (mask_bytes(numel),)
    assert torch.equal(y.detach().double().nan_to_num(), y64.detach().nan_to_num())  # ReLU is exact in every dtype
    assert torch.equal(unpack(mask, numel), ~(x.detach() <= 0))
    if numel % 8:  # padding bits of the last byte are zero
        assert int(mask[-1]) >> (numel % 8) == 0
    grad = torch.randn(numel, device=device).to(dtype)
    grad[0] = float("inf")  # where the mask is 0 the gradient is exactly 0, an infinite one too
    (gx,) = torch.autograd.grad(y, x, grad)
    (gx64,) = torch.autograd.grad(y64, x64, grad.double())
    assert gx.dtype == dtype
    assert torch.equal(gx.double().nan_to_num(), gx64.nan_to_num())
    assert torch.equal(gx, torch.ops.aten.threshold_backward(grad, torch.relu(x.detach()), 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_pure_pytorch_reference(device, dtype):
    x = special_values(torch.randn(3, 5, 7, 11, device=device).to(dtype))
    y, mask = relu_with_mask(x, impl="kernel")
    y_ref, mask_ref = relu_with_mask_reference(x)
    assert torch.equal(y.nan_to_num(), y_ref.nan_to_num()) and torch.equal(mask, mask_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "permuted", "sliced", "expanded", "offset"])
def test_layouts(device, layout):
    base = torch.randn(4, 6, 5, 9, device=device)
    x = {"channels_last": base.to(memory_format=torch.channels_last),
         "permuted": base.permute(3, 1, 0, 2),
         "sliced": base[:, ::2, 1:, :7],
         "expanded": torch.randn(4, 1, 5, 1, device=device).expand(4, 6, 5, 3),
         "offset": base.view(-1)[3:3 + 97]}[layout]
    x = x.requires_grad_() if x.is_leaf else x.detach().requires_grad_()
    y, mask = relu_with_mask(x, impl="kernel")
    if layout in ("channels_last", "permuted", "offset"):  # dense inputs keep their strides
        assert y.stride() == x.stride()
    assert torch.equal(y, torch.relu(x))
    assert torch.equal(unpack(mask, y.numel()), memory_order(y.detach()) > 0)
    grad = torch.randn_like(x).contiguous()  # a layout other than y's: the backward reorders it
    (gx,) = torch.autograd.grad(y, x, grad)
    assert torch.equal(gx, torch.where(x.detach() > 0, grad, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_in_a_graph_with_noncontiguous_gradient(device):
    x = torch.randn(8, 3, 4, device=device, requires_grad=True)
    weights = torch.randn(4, 3, 8, device=device)
    y, _ = relu_with_mask(x, impl="kernel")
    (y.transpose(0, 2) * weights).sum().backward()  # the gradient arrives transposed
    assert torch.equal(x.grad, torch.where(x.detach() > 0, weights.transpose(0, 2), 0))


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    x.data[x.data.abs() < 0.05] = 0.5  # away from the kink, where finite differences disagree
    assert torch.autograd.gradcheck(lambda t: relu_with_mask(t, impl="kernel")[0], x)
    assert torch.autograd.gradgradcheck(lambda t: relu_with_mask(t, impl="kernel")[0], x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, dtype):
    x = torch.randn(3, 7, 5, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.llkern.relu_with_mask.default, (x,))
    torch.library.opcheck(torch.ops.llkern.relu_with_mask.default, (x.transpose(0, 2).requires_grad_(),))
    _, mask = torch.ops.llkern.relu_with_mask(x)
    grad = torch.randn(3, 7, 5, device=device, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.llkern.relu_mask_backward.default, (grad, mask, [35, 5, 1]))


def test_torch_compile():
    def f(x):
        y, _ = relu_with_mask(x)
        return (y * 2).sum()

    x = torch.randn(6, 33, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, 2 * torch.relu(x).sum())
    assert torch.equal(x.grad, 2 * (x.detach() > 0).float())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    with pytest.raises(TypeError, match="expected x to be float32"):
        relu_with_mask(torch.ones(3, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="x"):
        relu_with_mask([1.0, 2.0])
    grad = torch.randn(10, device=device)
    _, mask = relu_with_mask(torch.randn(10, device=device))
    with pytest.raises(TypeError, match="mask to be uint8"):
        torch.ops.llkern.relu_mask_backward(grad, mask.float(), [1])
    with pytest.raises(ValueError, match="expected mask of shape \\[2\\]"):
        torch.ops.llkern.relu_mask_backward(grad, mask[:1], [1])
    with pytest.raises(ValueError, match="expected stride to have 1"):
        torch.ops.llkern.relu_mask_backward(grad, mask, [1, 1])
    with pytest.raises(ValueError, match="dense layout"):
        torch.ops.llkern.relu_mask_backward(grad, mask, [2])
    with pytest.raises(TypeError, match="grad"):
        torch.ops.llkern.relu_mask_backward(grad.long(), mask, [1])


def test_empty_input():
    x = torch.randn(0, 5, requires_grad=True)
    y, mask = relu_with_mask(x, impl="kernel")
    assert y.shape == (0, 5) and mask.shape == (0,)
    y.sum().backward()
    assert x.grad.shape == (0, 5)
