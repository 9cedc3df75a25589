"""Transport penalty (TRGL): the op's Python side.

``torch.ops.llkern.transport_penalty`` is declared in csrc/ops.cpp and implemented in
csrc/bindings/transport_{cpu,cuda}.cpp over the torch-free kernels csrc/{cpu,cuda}/transport.*.
This file checks inputs, registers the fake (shape-only) implementations and the autograd
formula, and picks kernel or reference (see llkern._ext).
"""

from __future__ import annotations

import numbers

import torch

from llkern._ext import extension_loaded, no_double_backward, use_kernel
from llkern.reference.transport import transport_penalty_reference

REDUCTIONS = ("mean", "sum_per_sample")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check(y: torch.Tensor, x: torch.Tensor | None, tau: float, reduction: str) -> None:
    name = "llkern.transport_penalty"
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected y to be a Tensor, got {type(y).__name__}")
    if y.dtype not in DTYPES:
        raise TypeError(f"{name}: expected y to be float32, float64, bfloat16 or float16, got {y.dtype}")
    if y.numel() == 0:
        raise ValueError(f"{name}: expected y to be non-empty, got shape {list(y.shape)}")
    if x is not None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected x to be a Tensor or None, got {type(x).__name__}")
        if x.shape != y.shape:
            raise ValueError(f"{name}: expected y and x to have the same shape, got {list(y.shape)} and "
                             f"{list(x.shape)}")
        if x.dtype != y.dtype:
            raise TypeError(f"{name}: expected x to have the dtype of y, got {x.dtype} and {y.dtype}")
        if x.device != y.device:
            raise ValueError(f"{name}: expected y and x on the same device, got {y.device} and {x.device}")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (0.0 < float(tau) < float("inf")):
        raise ValueError(f"{name}: expected tau to be a finite number > 0, got {tau!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: expected reduction to be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "sum_per_sample" and y.dim() == 0:
        raise ValueError(f"{name}: reduction='sum_per_sample' needs y with a batch dimension, got a 0-dim tensor")


def transport_penalty(
    y: torch.Tensor,
    x: torch.Tensor | None = None,
    tau: float = 1.0,
    reduction: str = "mean",
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """TRGL's transport (kinetic-energy) penalty of a residual r = y − x, or r = y when ``x`` is None.

    Args:
        y: module or block output ``(B, ...)``, or the residual itself when ``x`` is None.
        x: module input of the same shape and dtype (usually detached), or None.
        tau: τ > 0.
        reduction: ``"mean"`` gives ``mean(r²)/(2τ)`` over all elements (TRGL's code);
            ``"sum_per_sample"`` gives ``Σ‖r‖²/(2τB)`` with B = ``y.shape[0]`` (the paper's form).
        impl: ``"auto"``, ``"kernel"`` or ``"reference"`` (see :mod:`llkern._ext`).

    Returns:
        A 0-dim tensor: float64 for float64 inputs, float32 otherwise.
    """
    _check(y, x, tau, reduction)
    if use_kernel("transport_penalty", y.device, impl):
        needs_grad = torch.is_grad_enabled() and (y.requires_grad or (x is not None and x.requires_grad))
        # CPU: write the gradient in the forward's pass (2 passes over r instead of 3; the
        # backward only scales it when the upstream gradient is not 1). CUDA: the backward
        # re-reads r, which needs no host synchronisation on the upstream gradient.
        with_grad = needs_grad and y.device.type == "cpu"
        loss, _ = torch.ops.llkern.transport_penalty(y, x, float(tau), reduction, with_grad)
        return loss
    return transport_penalty_reference(y, x, float(tau), reduction)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_eager_cpu(t: torch.Tensor) -> bool:
    """A real CPU tensor, not one being traced (compile, opcheck, functorch): its value may be read."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def _setup_context(ctx, inputs, output) -> None:
    y, x, tau, reduction, with_grad = inputs
    _, grad_y = output
    ctx.mark_non_differentiable(grad_y)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the unused grad_y output
    # With the forward's gradient in hand the backward needs nothing else: keeping y too would
    # hold two r-sized buffers until the backward.
    ctx.save_for_backward(*((None, None, grad_y) if with_grad else (y, x, None)))
    ctx.tau = tau
    ctx.reduction = reduction


def _backward(ctx, grad, _grad_of_grad_y):
    no_double_backward("transport_penalty")
    y, x, grad_y = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None
    need_y, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_y or need_x):
        return None, None, None, None, None
    if grad_y is None:
        dy = torch.ops.llkern.transport_penalty_backward(grad, y, x, ctx.tau, ctx.reduction)
    elif _is_eager_cpu(grad) and grad.item() == 1.0:
        # The usual case (the penalty added to a loss): hand over the forward's buffer. Autograd
        # releases the saved copy before accumulating, so .grad takes it without a copy.
        dy = grad_y
    else:
        dy = (grad_y.to(grad.dtype) * grad).to(grad_y.dtype)  # one rounding for 16-bit dtypes
    return (dy if need_y else None), (-dy if need_x else None), None, None, None


if extension_loaded():

    @torch.library.register_fake("llkern::transport_penalty")
    def _fake(y, x, tau, reduction, with_grad=False):
        torch._check(x is None or x.shape == y.shape, lambda: "expected y and x to have the same shape")
        grad_y = y.new_empty(y.shape if with_grad else (0,))
        return y.new_empty((), dtype=_loss_dtype(y.dtype)), grad_y

    @torch.library.register_fake("llkern::transport_penalty_backward")
    def _fake_backward(grad, y, x, tau, reduction):
        return y.new_empty(y.shape)

    torch.library.register_autograd("llkern::transport_penalty", _backward, setup_context=_setup_context)
