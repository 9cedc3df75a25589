"""Fused auxiliary head (pool → linear → cross-entropy): the op's Python side.

``torch.ops.llkern.aux_head_loss`` is declared in csrc/ops.cpp and implemented in
csrc/bindings/aux_head_cpu.cpp over csrc/cpu/aux_head.cpp. The loss is a leaf of a local
graph, so the forward also forms d rows, d weight and d bias; the backward only scales them
and, for image features, broadcasts d pooled back over H×W (one write of d features). The
logits are never stored. Its autograd is C++ (csrc/bindings/aux_head_autograd.cpp): a Python
autograd wrapper cost more per call than the whole op on a GPU. The fake registrations, which
torch.compile traces through, are here.
"""

from __future__ import annotations

import contextlib
import numbers

import torch

from llkern._ext import autocast_on, check_values, extension_loaded, has_values, use_kernel
from llkern.reference.aux_head import aux_head_loss_reference

REDUCTIONS = ("mean", "sum")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check(features, weight, bias, target, ignore_index, label_smoothing, reduction, low_memory) -> None:
    name = "llkern.aux_head_loss"
    for arg, value in (("features", features), ("weight", weight), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected {arg} to be a Tensor, got {type(value).__name__}")
    if features.dtype not in DTYPES:
        raise TypeError(f"{name}: expected features to be float32, float64, bfloat16 or float16, got {features.dtype}")
    if features.dim() not in (2, 3, 4):
        raise ValueError(f"{name}: expected features of shape (B,C), (B,T,C) or (B,C,H,W), got {list(features.shape)}")
    if features.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got features of shape {list(features.shape)}")
    channels = features.shape[1] if features.dim() == 4 else features.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != channels or weight.shape[0] < 1:
        raise ValueError(f"{name}: expected weight of shape (classes, {channels}), got {list(weight.shape)}")
    if weight.dtype != features.dtype:
        raise TypeError(f"{name}: expected weight to have the dtype of features, got {weight.dtype} and "
                        f"{features.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{name}: expected bias to be a Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{name}: expected bias of shape ({weight.shape[0]},) to match the {weight.shape[0]} "
                             f"classes of weight, got {list(bias.shape)}")
        if bias.dtype != features.dtype:
            raise TypeError(f"{name}: expected bias to have the dtype of features, got {bias.dtype}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected target of dtype int64 or int32, got {target.dtype}")
    expected = tuple(features.shape[:2]) if features.dim() == 3 else tuple(features.shape[:1])
    if tuple(target.shape) != expected:
        hint = ""
        if features.dim() == 3 and tuple(target.shape) == expected[:1]:  # one label per sequence, per-token features
            hint = ("; (B, T, C) features take one target per token: for one label per sequence pool the tokens "
                    "first, e.g. LocalNet(..., heads=lambda k, shape: llkern.nn.TokenHead(num_classes, shape[-1], "
                    "pool=True))")
        raise ValueError(f"{name}: expected target of shape {list(expected)}, got {list(target.shape)}{hint}")
    for arg, value in (("weight", weight), ("bias", bias), ("target", target)):
        if value is not None and value.device != features.device:
            raise ValueError(f"{name}: expected {arg} on the device of features ({features.device}), "
                             f"got {value.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{name}: expected ignore_index to be an int, got {ignore_index!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
            or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"{name}: expected label_smoothing in [0, 1], got {label_smoothing!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: expected reduction to be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(low_memory, bool):
        raise TypeError(f"{name}: expected low_memory to be a bool, got {low_memory!r}")


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    if not autocast_on(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _autocast_inputs(features, weight, bias):
    """Cast ``weight`` and ``bias`` to the features' 16-bit dtype when autocast to that dtype is on."""
    if not (isinstance(features, torch.Tensor) and isinstance(weight, torch.Tensor)) \
            or weight.dtype == features.dtype or not autocast_on(features.device.type):
        return features, weight, bias
    low = torch.get_autocast_dtype(features.device.type)
    if features.dtype != low or weight.dtype != torch.float32:
        return features, weight, bias  # not the autocast pattern: _check names the mismatch
    if isinstance(bias, torch.Tensor) and bias.dtype == torch.float32:
        bias = bias.to(low)
    return features, weight.to(low), bias


def _check_labels_reference(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bad.any():
        value = target[bad][0].item()
        raise ValueError(f"llkern.aux_head_loss: target {value} is out of range for {classes} classes "
                         f"(ignore_index={ignore_index})")


def aux_head_loss(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    return_correct: bool = False,
    low_memory: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a linear classifier on mean-pooled features, fused; logits are never stored.

    ``(B,C,H,W)`` features (contiguous or channels_last) are mean-pooled to ``(B,C)``; ``(B,C)``
    features are used as they are; ``(B,T,C)`` features are classified per token (target
    ``(B,T)``). Then ``logits = rows @ weight.T + bias`` and cross-entropy as
    ``F.cross_entropy(logits, target, ignore_index=..., label_smoothing=..., reduction=...)``.
    A batch whose targets are all ``ignore_index`` gives loss 0 and zero gradients (not NaN).

    Args:
        features: ``(B,C,H,W)``, ``(B,C)`` or ``(B,T,C)``; float32, float64, bfloat16 or float16.
        weight: ``(classes, C)``, the dtype of ``features`` (see autocast below).
        bias: ``(classes,)`` or None, the dtype of ``weight``.
        target: int64 or int32 class indices, ``(B,)`` (``(B,T)`` for tokens).
        ignore_index: targets equal to it contribute neither loss nor gradient.
        label_smoothing: ε in [0, 1].
        reduction: ``"mean"`` (over the non-ignored targets) or ``"sum"``.
        return_correct: also return the number of correct predictions (first argmax equals the
            target, ignored targets excluded), counted in the kernel.
        low_memory: bfloat16 on a GPU, large heads (language-model heads: tokens × vocabulary): hold
            the logits in bfloat16 (as ``F.linear`` returns them) and sum d weight over the chunks
            of rows in bfloat16, as Liger-Kernel does, instead of float32 logits and a float32
            d weight (4 bytes per weight). Extra memory is then one 48 MiB chunk of logits and
            its rows, at the cost of one bfloat16 rounding of d weight per chunk (768 rows at
            32000 classes: 22 chunks for 16384 tokens). No effect on other dtypes, or on the CPU,
            where bfloat16 heads compute in float32.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"`` (see :mod:`llkern._ext`).

    Returns:
        The loss (float32; float64 for float64 inputs), and with ``return_correct`` an int64 count.
        The gradients reach the inputs in their dtypes; bfloat16 ones are rounded from float32
        sums over all classes (d features) or all rows (d weight, unless ``low_memory``).

    Labels out of range raise ``ValueError`` on the CPU. On a GPU that check would wait for the device,
    so by default it is skipped there and such a row gives a NaN loss and NaN gradients; turn it on with
    :func:`llkern.set_value_checks` (or ``LLKERN_VALUE_CHECKS=1``).

    Autocast: under ``torch.autocast`` on the features' device, 16-bit features with float32
    weight and bias (a head of float32 parameters on a module run under autocast) run in the
    autocast dtype, as ``F.linear`` would: weight and bias are cast, and their gradients reach the
    float32 parameters through the cast. The kernel accumulates in float32 either way. Inputs that
    already share a dtype are left as they are.
    """
    features, weight, bias = _autocast_inputs(features, weight, bias)
    _check(features, weight, bias, target, ignore_index, label_smoothing, reduction, low_memory)
    if use_kernel("aux_head_loss", features.device, impl):
        if features.device.type != "cpu" and check_values(target):  # (the CPU kernel checks as it reads)
            _check_labels_reference(target, weight.shape[0], ignore_index)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (features, weight, bias))
        loss, correct, *_ = torch.ops.llkern.aux_head_loss(features, weight, bias, target, int(ignore_index),
                                                           float(label_smoothing), reduction, needs_grad,
                                                           low_memory)
    else:
        # (on a GPU too: F.cross_entropy would stop the device with an assert on a bad label)
        if has_values(target):
            _check_labels_reference(target, weight.shape[0], ignore_index)
        # the reference picks its own accumulation dtype: autocast must not re-cast its steps
        with _no_autocast(features.device.type):
            loss, correct = aux_head_loss_reference(features, weight, bias, target, ignore_index,
                                                    float(label_smoothing), reduction)
    return (loss, correct) if return_correct else loss


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_dtypes(features: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """dtypes of the op's d rows and d weight (csrc/bindings/aux_head_common.h: grad_rows_dtype)."""
    acc = _acc_dtype(features.dtype)
    if features.dtype != torch.bfloat16:
        return acc, acc
    return (acc if features.dim() == 4 else torch.bfloat16), torch.bfloat16


if extension_loaded():

    @torch.library.register_fake("llkern::aux_head_loss")
    def _fake(features, weight, bias, target, ignore_index, label_smoothing, reduction, with_grad=False,
              low_memory=False):
        acc = _acc_dtype(features.dtype)
        rows_dtype, weight_dtype = _grad_dtypes(features)
        channels = features.shape[1] if features.dim() == 4 else features.shape[-1]
        rows = features.shape[0] * features.shape[1] if features.dim() == 3 else features.shape[0]
        classes = weight.shape[0]
        return (
            features.new_empty((), dtype=acc),
            features.new_empty((), dtype=torch.int64),
            features.new_empty((rows, channels) if with_grad else (0,), dtype=rows_dtype),
            features.new_empty((classes, channels) if with_grad else (0,), dtype=weight_dtype),
            features.new_empty((classes,) if with_grad and bias is not None else (0,), dtype=acc),
        )

    @torch.library.register_fake("llkern::aux_head_backward")
    def _fake_backward(grad_loss, grad_pooled, sizes, channels_last, dtype):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(sizes, dtype=dtype, device=grad_pooled.device, memory_format=memory_format)
