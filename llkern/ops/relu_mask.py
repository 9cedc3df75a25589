"""ReLU with a 1-bit mask: the op's Python side.

``torch.ops.llkern.relu_with_mask(x) -> (y, mask)`` writes ``relu(x)`` and the bit-packed mask
``not (x <= 0)`` (8 elements per byte, element ``8i + j`` of ``y``'s memory order at bit ``j`` of byte
``i``) in one pass; ``relu_mask_backward(grad, mask, stride)`` forms ``mask ? grad : 0`` in one pass.
Declared in csrc/ops.cpp, implemented in csrc/bindings/relu_mask_{cpu,cuda}.cpp over the torch-free
kernels csrc/{cpu,cuda}/relu_mask.*. This file checks inputs and registers the fake (shape-only)
implementations and the autograd formulas: relu_with_mask saves only the mask (1/32 of a float32
output's bytes, 1/16 of a 16-bit one), and relu_mask_backward is itself differentiable (it is linear in
``grad``), so double backward works.
"""

from __future__ import annotations

import torch

from llkern._ext import extension_loaded, use_kernel

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def mask_bytes(numel: int) -> int:
    """Bytes of the packed mask of a tensor of ``numel`` elements."""
    return (numel + 7) // 8


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"llkern.relu_with_mask: expected x to be a Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"llkern.relu_with_mask: expected x to be float32, float64, bfloat16 or float16, got {x.dtype}")


def relu_with_mask(x: torch.Tensor, *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(x), mask)``: the ReLU and its packed 1-bit mask, which is all its backward keeps.

    Args:
        x: any shape and strides, float32/float64/bfloat16/float16.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"`` (see :mod:`llkern._ext`).

    Returns:
        ``y`` with ``x``'s strides when ``x`` is dense (contiguous, channels_last, any permutation), else
        dense in ``x``'s dim order; and ``mask``, a 1-D uint8 tensor of ``ceil(numel / 8)`` bytes whose bit
        ``k`` is ``not (x <= 0)`` for the ``k``-th element of ``y``'s memory order (NaN passes, as
        ``torch.relu`` keeps it). Gradients flow to ``x`` through ``y``; the mask is not differentiable.
    """
    _check(x)
    if use_kernel("relu_with_mask", x.device, impl):
        return torch.ops.llkern.relu_with_mask(x)
    return relu_with_mask_reference(x)


def _by_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its dims permuted into decreasing stride: contiguous exactly when ``t`` is dense."""
    return t.permute(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d))))


def relu_with_mask_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch :func:`relu_with_mask` (same values, same mask bits)."""
    y = torch.relu(x)
    with torch.no_grad():
        values = _by_stride(y.detach())
        values = values.reshape(-1) if values.is_contiguous() else y.detach().reshape(-1)
        alive = (values > 0) | torch.isnan(values)  # not (x <= 0)
        bits = torch.cat([alive, alive.new_zeros(-alive.numel() % 8)]).view(-1, 8).to(torch.uint8)
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=x.device)
        mask = (bits * weights).sum(dim=1, dtype=torch.uint8)
    return y, mask


def _setup_context(ctx, inputs, output) -> None:
    y, mask = output
    ctx.mark_non_differentiable(mask)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(mask)
    ctx.stride = list(y.stride())


def _backward(ctx, grad, _grad_mask):
    if grad is None or not ctx.needs_input_grad[0]:
        return None
    (mask,) = ctx.saved_tensors
    return torch.ops.llkern.relu_mask_backward(grad, mask, ctx.stride)


def _setup_context_backward(ctx, inputs, output) -> None:
    _, mask, stride = inputs
    ctx.save_for_backward(mask)
    ctx.stride = list(stride)


def _backward_backward(ctx, grad_grad_x):
    # grad_x = mask * grad is linear in grad: its derivative applies the same mask.
    (mask,) = ctx.saved_tensors
    return torch.ops.llkern.relu_mask_backward(grad_grad_x, mask, ctx.stride), None, None


if extension_loaded():

    @torch.library.register_fake("llkern::relu_with_mask")
    def _fake(x):
        return torch.empty_like(x), x.new_empty((mask_bytes(x.numel()),), dtype=torch.uint8)

    @torch.library.register_fake("llkern::relu_mask_backward")
    def _fake_backward(grad, mask, stride):
        torch._check(mask.numel() == mask_bytes(grad.numel()), lambda: "expected one mask bit per element of grad")
        return torch.empty_strided(grad.shape, stride, dtype=grad.dtype, device=grad.device)

    torch.library.register_autograd("llkern::relu_with_mask", _backward, setup_context=_setup_context)
    torch.library.register_autograd("llkern::relu_mask_backward", _backward_backward,
                                    setup_context=_setup_context_backward)
