"""BatchNorm + ReLU with recomputation: the op's Python side.

``torch.ops.llkern.batch_norm_relu(input, weight, bias, mean, invstd, training)`` writes
``relu(input * scale + shift)`` (per channel ``scale = weight * invstd``, ``shift = bias - mean * scale``)
in one pass; ``batch_norm_relu_backward`` recomputes the BN output and the ReLU mask from ``input`` and
applies BatchNorm's backward in the same passes (one reduction pass over ``input`` and ``grad``, one
pass writing ``grad_input``), so neither the BN output nor a mask is ever saved. Declared in
csrc/ops.cpp, implemented in csrc/bindings/batch_norm_relu_{cpu,cuda}.cpp over the torch-free kernels
csrc/{cpu,cuda}/batch_norm_relu.*. This file checks inputs and registers the fake implementations and
the autograd formula. The statistics come from the caller (``torch.batch_norm_update_stats`` in
:func:`llkern.nn.activation_memory.batch_norm_relu`).
"""

from __future__ import annotations

import torch

from llkern._ext import extension_loaded, no_double_backward

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the statistics and of the affine map: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
                 invstd: torch.Tensor, name: str = "llkern.batch_norm_relu") -> None:
    """The op's argument checks, raised with the argument's name: what the fake implementation runs, so that
    ``torch.compile`` and meta tensors refuse what the C++ op refuses (csrc/bindings/batch_norm_relu_common.h)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}: expected input to be a Tensor, got {type(input).__name__}")
    if input.dtype not in DTYPES:
        raise TypeError(f"{name}: expected input to be float32, float64, bfloat16 or float16, got {input.dtype}")
    if input.dim() < 2 or input.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty input of shape (N, C, *), got {list(input.shape)}")
    channels, compute = input.shape[1], compute_dtype(input.dtype)
    for arg, t, dtypes in (("weight", weight, (input.dtype, compute)), ("bias", bias, (input.dtype, compute)),
                           ("mean", mean, (compute,)), ("invstd", invstd, (compute,))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected {arg} to be a Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (channels,):
            raise ValueError(f"{name}: expected {arg} of shape [{channels}] (the channels of input), "
                             f"got {list(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected {arg} to be {' or '.join(map(str, dtypes))} for {input.dtype} input, "
                            f"got {t.dtype}")
        if t.device != input.device:
            raise ValueError(f"{name}: expected {arg} on the device of input ({input.device}), got {t.device}")


def check_grad(grad: torch.Tensor, input: torch.Tensor, name: str = "llkern.batch_norm_relu_backward") -> None:
    """The backward's checks of ``grad`` against ``input``."""
    if tuple(grad.shape) != tuple(input.shape):
        raise ValueError(f"{name}: expected grad of the shape of input {list(input.shape)}, got {list(grad.shape)}")
    if grad.dtype != input.dtype:
        raise TypeError(f"{name}: expected grad to have the dtype of input ({input.dtype}), got {grad.dtype}")
    if grad.device != input.device:
        raise ValueError(f"{name}: expected grad on the device of input ({input.device}), got {grad.device}")


def output_format(input: torch.Tensor) -> torch.memory_format:
    """The memory format of the op's outputs: channels_last for a channels_last input, else contiguous."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    fmt = formats.get(input.dim())
    if fmt is not None and not input.is_contiguous() and input.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, mean, invstd, training = inputs
    ctx.save_for_backward(input, weight, bias, mean, invstd)
    ctx.training = training


def _backward(ctx, grad):
    no_double_backward("batch_norm_relu")
    input, weight, bias, mean, invstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if needs[3] or needs[4]:
        raise RuntimeError("llkern.batch_norm_relu: mean and invstd are constants of the op (compute them under "
                           "torch.no_grad()); with training=True their gradient is part of input's")
    grad_input, grad_weight, grad_bias = torch.ops.llkern.batch_norm_relu_backward(
        grad, input, weight, bias, mean, invstd, ctx.training, needs[0])
    return ((grad_input if needs[0] else None), (grad_weight if weight is not None and needs[1] else None),
            (grad_bias if bias is not None and needs[2] else None), None, None, None)


if extension_loaded():

    @torch.library.register_fake("llkern::batch_norm_relu")
    def _fake(input, weight, bias, mean, invstd, training):
        check_inputs(input, weight, bias, mean, invstd)
        return torch.empty_like(input, memory_format=output_format(input))

    @torch.library.register_fake("llkern::batch_norm_relu_backward")
    def _fake_backward(grad, input, weight, bias, mean, invstd, training, input_grad=True):
        check_inputs(input, weight, bias, mean, invstd, "llkern.batch_norm_relu_backward")
        check_grad(grad, input)
        grad_input = torch.empty_like(input, memory_format=output_format(input)) if input_grad else input.new_empty(0)
        grad_weight = weight.new_empty(weight.shape) if weight is not None else input.new_empty(0)
        grad_bias = bias.new_empty(bias.shape) if bias is not None else input.new_empty(0)
        return grad_input, grad_weight, grad_bias

    torch.library.register_autograd("llkern::batch_norm_relu", _backward, setup_context=_setup_context)
