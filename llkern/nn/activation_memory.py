"""Smaller saved activations inside a module: 1-bit ReLU masks, BN+ReLU recomputation, low-precision storage.

Local training bounds the activation memory by the largest module; these options shrink what a module
itself keeps for its backward. Each is a drop-in replacement, and :func:`convert` applies them to a model
in place. Which bytes an option actually removes depends on what the *neighbouring* layers save: a tensor
saved by two ops is one storage, and it only goes away when neither keeps it. Measure with
:class:`llkern.MemoryMeter` (it counts distinct storages), as ``bench/activation_memory.py`` does.

- :class:`BitMaskReLU` / :func:`bitmask_relu` (exact): ReLU's backward needs only the sign of its output,
  so it saves a bit-packed mask (8 elements per byte) instead of the output, written in the forward's one
  pass by the compiled op ``relu_with_mask`` (:mod:`llkern.ops.relu_mask`). This removes bytes only when
  nothing else saves the ReLU's output. Layers that read a ReLU's output usually save it themselves: a
  convolution or linear layer saves its input for the weight gradient, max-pooling saves its input, and in a
  pre-activation block (BN → ReLU → conv) the conv saves exactly the tensor the ReLU saved. There the mask
  *adds* 1/32 of the output's float32 bytes. The saving is real when the ReLU feeds only ops that keep
  nothing of their input: a sum or residual add, ``mean`` (global average pooling), a multiplication by a
  constant, dropout (which saves its own mask). And only when the output is not otherwise alive: a
  module's last ReLU produces the next module's (detached) input, which LocalNet holds until the module's
  backward has run, so there the meter's count drops while the bytes stay allocated.
- :class:`BatchNormReLU` / :func:`batch_norm_relu` (exact): BN followed by ReLU in one autograd node that
  saves the BN's input and per-channel mean and 1/std (training) instead of BN's input *and* the ReLU
  output, and recomputes the BN output and the ReLU mask in the backward (same formula as BatchNorm's
  training-mode backward, ``native_batch_norm_backward``). Alone, this removes the ReLU output's bytes only
  when the next layer does not save it (the same condition as for the masks). When the next layer is a
  convolution, :class:`RecomputeInputConv2d` takes over: it recognises a BatchNormReLU output as its input
  and does not save it either; its backward recomputes it from the BN input and statistics. A
  BN → ReLU → conv sequence then saves only the BN's input (plus per-channel statistics): a
  pre-activation residual branch ``BN→ReLU→conv→BN→ReLU→conv`` keeps 2 of its 4 activation-sized tensors.
  The cost is an element-wise recomputation (``x·scale + shift``, ReLU) in the backward, which the
  compiled ``batch_norm_relu_backward`` (:mod:`llkern.ops.batch_norm_relu`) folds into BatchNorm's own
  backward passes.
- :func:`saved_tensors_in` (approximate): a context manager storing floating saved tensors in bfloat16
  (or float16) and restoring their dtype when the backward reads them. Halves the saved bytes of float32
  models; the gradients become approximate (each saved value is rounded to 8 significant bits for
  bfloat16, 11 for float16).

- :func:`recompute_segments` (exact, :mod:`llkern.nn.recompute`): an ``nn.Sequential`` cut into segments, all but
  the last run without saving anything but their input and recomputed in the backward (checkpointing inside a
  module; about one more forward per step).

:func:`convert` replaces ``nn.ReLU`` modules and ``BatchNorm2d → ReLU`` (→ ``Conv2d``) runs inside
``nn.Sequential`` containers, keeping the same parameter objects, buffers and ``state_dict`` keys.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _NormBase

import llkern.ops.batch_norm_relu
import llkern.ops.relu_mask  # noqa: F401
from llkern._ext import kernel_available
from llkern._saved_hooks import can_see_outer_hooks, handed_on, outer_saved_tensors_hooks
from llkern.nn.recompute import recompute_modules, recompute_segments  # the fourth option, in its own file
from llkern.ops.cast import cast_pooled

__all__ = [
    "BatchNormReLU",
    "BitMaskReLU",
    "RecomputeInputConv2d",
    "batch_norm_relu",
    "bitmask_relu",
    "convert",
    "pack_bits",
    "recompute_modules",
    "recompute_segments",
    "saved_tensors_in",
    "unpack_bits",
]

# --------------------------------------------------------------------------------------------------------
# Bit packing
# --------------------------------------------------------------------------------------------------------

_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    # One small tensor per device, made once: a fresh host-to-device copy per call would synchronise.
    weights = _BIT_WEIGHTS.get(device)
    if weights is None:
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)
        _BIT_WEIGHTS[device] = weights
    return weights


# Packing works on 64-bit words, each holding 8 mask bytes that are 0 or 1 (bool's storage), byte k at bit 8k
# on a little-endian machine. Three shift-or steps gather them into the low byte: 7 whole-tensor ops on
# numel/8 words, where a multiply-and-sum over groups of 8 bytes takes numel-sized passes (2.5x slower on a
# CPU). Unpacking runs the steps backwards.
_LITTLE_ENDIAN = sys.byteorder == "little"


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into bytes, 8 elements per byte (element ``8i + j`` is bit ``j`` of byte ``i``).

    Elements are taken in the tensor's logical (row-major) order whatever its strides; the tail is padded
    with zeros. Returns a 1-D ``uint8`` tensor of ``ceil(numel / 8)`` bytes on ``mask``'s device.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_bits: expected mask to be a bool tensor, got {mask.dtype}")
    if mask.storage_offset() % 8:
        mask = mask.clone()  # a 64-bit view needs an aligned start
    return _pack_aligned(mask)


def _pack_aligned(mask: torch.Tensor) -> torch.Tensor:
    """:func:`pack_bits` for a mask starting at a multiple of 8 bytes in its storage (a fresh tensor does)."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # bool is one byte holding 0 or 1: viewing it as integers costs nothing.
    if not _LITTLE_ENDIAN:
        groups = flat.view(torch.uint8).view(-1, 8)  # bits are disjoint, so their uint8 sum never carries
        return (groups * _bit_weights(mask.device)).sum(dim=1, dtype=torch.uint8)
    words = flat.view(torch.uint8).view(torch.int64)
    words = words | (words >> 7)  # byte k: bits 0-1 = mask[k], mask[k+1]
    words |= words >> 14  # bits 0-3 = mask[k..k+3]
    words |= words >> 28  # byte 0: bits 0-7 = mask[0..7]
    return (words & 0xFF).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the boolean tensor of ``shape`` (contiguous) packed in ``packed``."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"unpack_bits: expected packed to be a 1-D uint8 tensor, got {packed.dim()}-D {packed.dtype}")
    numel = 1
    for size in shape:
        numel *= size
    if packed.numel() != -(-numel // 8):
        raise ValueError(f"unpack_bits: expected {-(-numel // 8)} bytes for shape {list(shape)}, got {packed.numel()}")
    return _unpack_bytes(packed, numel).view(torch.bool).view(shape)


def _unpack_bytes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` bits of ``packed`` as a flat uint8 tensor of 0s and 1s."""
    if not _LITTLE_ENDIAN:
        return ((packed.unsqueeze(1) & _bit_weights(packed.device)) != 0).view(torch.uint8).view(-1)[:numel]
    words = packed.to(torch.int64)
    words = (words | (words << 28)) & 0x0000000F0000000F
    words = (words | (words << 14)) & 0x0003000300030003
    words = (words | (words << 7)) & 0x0101010101010101
    return words.view(torch.uint8)[:numel]


# --------------------------------------------------------------------------------------------------------
# 1-bit ReLU masks
# --------------------------------------------------------------------------------------------------------


class _BitMaskReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        # PyTorch's ReLU backward passes the gradient where the output is not <= 0, so a NaN output
        # passes it too: the mask is "not (y <= 0)" (negated on the packed bytes), not "y > 0".
        ctx.save_for_backward(_pack_aligned(y <= 0).bitwise_not_())
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (packed,) = ctx.saved_tensors
        # ReLU's own backward kernel on the 0/1 mask: an infinite gradient where the output is 0 gives 0,
        # as in PyTorch (a product would give NaN), and it is several times faster than where/masked_fill.
        # (uint8 to float, not bool to float: Inductor's CPU code for the latter does not compile in torch 2.13.)
        alive = _unpack_bytes(packed, grad.numel()).view(ctx.shape).to(grad.dtype)
        return torch.ops.aten.threshold_backward(grad, alive, 0)


def bitmask_relu(input: torch.Tensor) -> torch.Tensor:
    """``relu(input)``, saving a 1-bit mask of the output's sign for the backward instead of the output.

    Same values and gradients as :func:`torch.relu`; the saved mask takes ``ceil(numel / 8)`` bytes. See
    the module docstring for when this lowers the memory actually held. Runs the compiled op
    ``torch.ops.llkern.relu_with_mask`` (one pass each way) when llkern._C has it for the input's device,
    else the same computation in PyTorch ops.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"bitmask_relu: expected input to be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"bitmask_relu: expected a floating-point input, got {input.dtype}")
    if input.dtype in _KERNEL_DTYPES and kernel_available("relu_with_mask", input.device.type):
        return torch.ops.llkern.relu_with_mask(input)[0]
    return _BitMaskReLUFunction.apply(input)


class BitMaskReLU(nn.Module):
    """Drop-in for ``nn.ReLU`` whose backward keeps a 1-bit mask instead of the output (:func:`bitmask_relu`).

    ``inplace`` is accepted for signature compatibility and ignored: the output is always a new tensor.
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return bitmask_relu(input)


# --------------------------------------------------------------------------------------------------------
# BatchNorm + ReLU with recomputation
# --------------------------------------------------------------------------------------------------------

_RECOMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = _RECOMPUTE_DTYPES
_RECIPE_ATTR = "_llkern_bn_relu_recipe"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Statistics and the affine map of 16-bit inputs are computed in float32, as PyTorch's BN kernels do.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pre_activation(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """BN's output ``x·scale + shift`` with per-channel ``scale = weight·invstd``, ``shift = bias − mean·scale``.

    The forward and the backward both call this, so the recomputed output, and with it the ReLU mask, is
    bit-identical to the forward's: two separate element-wise ops (no fused multiply-add that a compiler
    might contract differently in vectorised and scalar loops).
    """
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(invstd.dtype)
    view = [1, -1] + [1] * (x.dim() - 2)
    return (x * scale.view(view)).add_(shift.view(view))


def _relu_backward(grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """0 where ``z <= 0``, else ``grad`` (a NaN ``z`` passes it, as ReLU's backward does; an infinite gradient where
    ``z <= 0`` gives 0): one pass."""
    if z.dtype == grad.dtype:
        return torch.ops.aten.threshold_backward(grad, z, 0)
    # 16-bit inputs: z is float32, the gradient keeps the input's dtype. ``z <= 0`` (not ``z > 0``) lets the
    # gradient through at a NaN, as threshold_backward and the kernels do.
    return torch.where(z <= 0, 0, grad)


class _Recipe:
    """What a BatchNormReLU output carries so that the next conv can recompute it instead of saving it."""

    __slots__ = ("bias", "invstd", "kernel", "mean", "training", "version", "weight", "x", "x_version")

    def __init__(self, x, weight, bias, mean, invstd, training, version, kernel: bool) -> None:
        self.x, self.weight, self.bias, self.mean, self.invstd = x, weight, bias, mean, invstd
        self.training, self.version, self.kernel = training, version, kernel
        self.x_version = x._version  # the conv recomputes from x: a change since the BN ran rules that out


def _batch_norm_backward(grad_z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                         mean: torch.Tensor, invstd: torch.Tensor, running_mean: torch.Tensor | None,
                         running_var: torch.Tensor | None, training: bool, eps: float,
                         needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """PyTorch's own BatchNorm backward, given the statistics the forward used."""
    if x.numel() == 0:  # an empty batch (eval mode): ATen's CPU kernel divides by the zero count
        zeros = torch.zeros(x.shape[1], dtype=weight.dtype if weight is not None else mean.dtype, device=x.device)
        return (torch.zeros_like(x) if needs[0] else None, zeros if needs[1] else None,
                zeros.clone() if needs[2] else None)
    if weight is not None and weight.dtype != mean.dtype:
        # 16-bit parameters beside float32 statistics: ATen's mixed-type path wants float32 parameters.
        gx, gw, gb = _batch_norm_backward(grad_z, x, weight.to(mean.dtype), mean, invstd, running_mean, running_var,
                                          training, eps, needs)
        return gx, (gw.to(weight.dtype) if gw is not None else None), (gb.to(weight.dtype) if gb is not None else None)
    if training:
        return torch.ops.aten.native_batch_norm_backward(grad_z, x, weight, None, None, mean, invstd, True, eps,
                                                         list(needs))
    return torch.ops.aten.native_batch_norm_backward(grad_z, x, weight, running_mean, running_var, None, None,
                                                     False, eps, list(needs))


class _BatchNormReLUFunction(torch.autograd.Function):
    """relu(BN(x)) given the statistics; saves x and the statistics, recomputes the rest in the backward."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, mean, invstd, running_mean, running_var, training: bool, eps: float):
        z = _pre_activation(x, weight, bias, mean, invstd)
        ctx.save_for_backward(x, weight, bias, mean, invstd, running_mean, running_var)
        ctx.training, ctx.eps = training, eps
        return z.relu_().to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        x, weight, bias, mean, invstd, running_mean, running_var = ctx.saved_tensors
        grad_z = _relu_backward(grad, _pre_activation(x, weight, bias, mean, invstd))
        needs = (ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[2])
        gx, gw, gb = _batch_norm_backward(grad_z, x, weight, mean, invstd, running_mean, running_var, ctx.training,
                                          ctx.eps, needs)
        return gx, gw, gb, None, None, None, None, None, None


class _BatchNormReLUConv2dFunction(torch.autograd.Function):
    """conv2d(a) for ``a = relu(BN(x))``, saving x and BN's statistics instead of ``a``.

    The backward recomputes ``a`` for the conv's weight gradient and hands ``a``'s gradient to ``a``'s own
    autograd node (the BatchNormReLU's), which runs BN's backward: hooks and ``retain_grad`` on ``a`` see it,
    a second consumer of ``a`` shares one BN backward, and that node's saved ``x`` catches an in-place change.
    """

    @staticmethod
    def forward(ctx: Any, activation: torch.Tensor, x, bn_weight, bn_bias, mean, invstd, conv_weight, conv_bias,
                training: bool, stride, padding, dilation, groups: int, kernel: bool):
        # ``activation`` is the BatchNormReLU output the forward already has: no recomputation here, and it
        # is not saved. ``x`` and the statistics are the tensors BatchNormReLU's node saved (same storages).
        ctx.save_for_backward(x, bn_weight, bn_bias, mean, invstd, conv_weight)
        ctx.training, ctx.has_conv_bias, ctx.kernel = training, conv_bias is not None, kernel
        ctx.conv = (list(stride), list(padding), list(dilation), groups)
        return F.conv2d(activation, conv_weight, conv_bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):
        x, bn_weight, bn_bias, mean, invstd, conv_weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        needs = ctx.needs_input_grad
        if ctx.kernel:
            # The compiled op recomputes with the same kernel that produced the forward's activation.
            activation = torch.ops.llkern.batch_norm_relu(x, bn_weight, bn_bias, mean, invstd, ctx.training)
        else:
            activation = _pre_activation(x, bn_weight, bn_bias, mean, invstd).relu_().to(x.dtype)
        # The same aten op nn.Conv2d's autograd calls, on the same (recomputed, bit-identical) input.
        grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, activation, conv_weight, [conv_weight.shape[0]] if ctx.has_conv_bias else None, stride, padding,
            dilation, False, [0, 0], groups, [needs[0], needs[6], ctx.has_conv_bias and needs[7]])
        return grad_a, None, None, None, None, None, grad_w, grad_b, None, None, None, None, None, None


def _bn_relu_kernel(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether the compiled BatchNorm+ReLU ops serve this input (built for its device, parameters in its dtype
    or the compute dtype); otherwise the same computation runs in PyTorch ops."""
    compute = _compute_dtype(input.dtype)
    return (input.dtype in _KERNEL_DTYPES and input.numel() > 0
            and kernel_available("batch_norm_relu", input.device.type)
            and all(t is None or (t.dtype in (input.dtype, compute) and t.device == input.device)
                    for t in (weight, bias)))


def batch_norm_relu(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """``relu(F.batch_norm(input, ...))`` (same arguments as :func:`torch.nn.functional.batch_norm`), saving
    only ``input`` and per-channel statistics for the backward.

    ``input`` is ``(N, C, *)``, float16/bfloat16/float32/float64 (16-bit inputs: statistics in float32).
    With ``training=True`` the batch statistics normalise, and the running statistics (when given) are
    updated in place with ``momentum`` (the unbiased variance, as PyTorch does); otherwise the running
    statistics normalise. The backward recomputes ``BN(input)`` and its sign, then applies PyTorch's
    BatchNorm backward. When the result feeds a :class:`RecomputeInputConv2d`, that conv does not save it.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm_relu: expected input to be a Tensor, got {type(input).__name__}")
    if input.dtype not in _RECOMPUTE_DTYPES:
        raise TypeError("batch_norm_relu: expected input of dtype float16, bfloat16, float32 or float64 "
                        f"(the BN+ReLU recomputation needs a floating-point input), got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"batch_norm_relu: expected input of shape (N, C, *), got {list(input.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm_relu: expected running_mean and running_var to be both given or both None")
    if not training and running_mean is None:
        raise ValueError("batch_norm_relu: training=False needs running_mean and running_var")
    channels = input.shape[1]
    for name, tensor in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                         ("running_var", running_var)):
        if tensor is not None and tuple(tensor.shape) != (channels,):
            raise ValueError(f"batch_norm_relu: expected {name} of shape [{channels}] (the channels of input), "
                             f"got {list(tensor.shape)}")
    compute = _compute_dtype(input.dtype)
    if training:
        count = input.numel() // max(channels, 1)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        with torch.no_grad():
            # PyTorch's BatchNorm statistics kernel: batch mean and biased variance, and the running
            # statistics updated in place as nn.BatchNorm2d does (unbiased variance, ``momentum``).
            if running_mean is None and compute != input.dtype:
                # The kernel returns statistics in its running buffers' dtype, else in the input's: 16-bit
                # inputs without running statistics get float32 scratch buffers (left unchanged: momentum 0)
                # so that the mean is not rounded to 16 bits.
                scratch = torch.zeros(channels, dtype=compute, device=input.device)
                mean, var = torch.batch_norm_update_stats(input.detach(), scratch, torch.ones_like(scratch), 0.0)
            else:
                mean, var = torch.batch_norm_update_stats(input.detach(), running_mean, running_var, momentum)
            mean, invstd = mean.to(compute), torch.rsqrt(var.to(compute) + eps)
        saved_running = (None, None)
    else:
        with torch.no_grad():
            mean = running_mean.to(compute)
            invstd = torch.rsqrt(running_var.to(compute) + eps)
        saved_running = (running_mean, running_var)
    kernel = _bn_relu_kernel(input, weight, bias)
    if kernel:
        # One pass forward; the backward recomputes and applies BN's backward in two (see llkern.ops.batch_norm_relu).
        out = torch.ops.llkern.batch_norm_relu(input, weight, bias, mean, invstd, training)
    else:
        out = _BatchNormReLUFunction.apply(input, weight, bias, mean, invstd, *saved_running, training, eps)
    if out.requires_grad:
        # The recipe lets a following RecomputeInputConv2d avoid saving ``out``. It lives as long as ``out``,
        # whose autograd node holds the same tensors until its backward has run: it costs no memory then, and
        # after that only while the caller keeps ``out`` itself (its input then stays allocated with it).
        setattr(out, _RECIPE_ATTR, _Recipe(input, weight, bias, mean, invstd, training, out._version, kernel))
    return out


class BatchNormReLU(_NormBase):
    """Drop-in for ``nn.BatchNorm2d(...)`` followed by ``nn.ReLU()``, recomputing both in the backward.

    Same constructor, parameters (``weight``, ``bias``), buffers (``running_mean``, ``running_var``,
    ``num_batches_tracked``) and ``state_dict`` keys as ``nn.BatchNorm2d``, and the same training/eval
    behaviour (batch statistics and running-statistics update with ``momentum``, or the cumulative
    average when ``momentum=None``; running statistics in eval; batch statistics when
    ``track_running_stats=False``). Input ``(N, C, H, W)``. See :func:`batch_norm_relu` for what is saved.

    It derives from BatchNorm's base class, not from ``nn.BatchNorm2d``: code that swaps every
    ``isinstance(m, nn.BatchNorm2d)`` for another norm (``convert_sync_batchnorm``, BN folding) would
    silently drop the ReLU.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"BatchNormReLU: expected 4D input (got {input.dim()}D input)")

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> BatchNormReLU:
        """A BatchNormReLU sharing ``bn``'s parameter and buffer tensors (same objects) and training flag."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  device=bn.running_mean.device if bn.running_mean is not None else None)
        for name in ("weight", "bias"):
            setattr(new, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[name] = bn._buffers.get(name)
        return new.train(bn.training)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # The same momentum logic as nn.BatchNorm2d.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm_relu(input, self.running_mean if track else None, self.running_var if track else None,
                               self.weight, self.bias, bn_training, factor, self.eps)


class RecomputeInputConv2d(nn.Conv2d):
    """``nn.Conv2d`` that does not save its input when that input comes straight from a :class:`BatchNormReLU`.

    The backward recomputes the input, ``relu(BN(x))``, from the BN's input and statistics (which the
    BatchNormReLU saves anyway) and runs the convolution's backward; the input's gradient goes to the
    BatchNormReLU output's own node, which runs BN's backward (so hooks, ``retain_grad`` and
    ``torch.autograd.grad`` on that output work, and an in-place change of ``x`` fails the backward as it
    does for the plain modules). Any other input
    (or padding modes other than ``"zeros"``, string paddings, an input modified in place since the
    BatchNormReLU produced it, and everything under ``torch.compile``) takes ``nn.Conv2d``'s own path.
    Values and gradients equal ``nn.Conv2d``'s: the recomputed input is bit-identical to the forward's.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> RecomputeInputConv2d:
        """A RecomputeInputConv2d sharing ``conv``'s parameter objects and settings."""
        # Built on the meta device with the RNG state restored: the constructor's random initialisation
        # would otherwise move the global RNG, and every module created after a conversion (the heads of a
        # LocalNet) would start from other weights than without it.
        with torch.random.fork_rng(devices=[]):
            new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
                      dtype=conv.weight.dtype)
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        return new.train(conv.training)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Under torch.compile the plain path: the compiler cannot trace the version check, and its own
        # partitioner already recomputes cheap element-wise ops such as BN and ReLU instead of saving them.
        if torch.compiler.is_compiling():
            return super().forward(input)
        recipe = getattr(input, _RECIPE_ATTR, None)
        if (recipe is None or not torch.is_grad_enabled() or self.padding_mode != "zeros"
                or isinstance(self.padding, str) or input._version != recipe.version
                or recipe.x._version != recipe.x_version):
            return super().forward(input)
        r = recipe
        # The recipe's tensors go in detached: their gradients come through ``input``'s own node.
        detached = [t if t is None else t.detach() for t in (r.x, r.weight, r.bias, r.mean, r.invstd)]
        return _BatchNormReLUConv2dFunction.apply(input, *detached, self.weight, self.bias, r.training,
                                                  self.stride, self.padding, self.dilation, self.groups, r.kernel)


# --------------------------------------------------------------------------------------------------------
# Saved tensors in reduced precision
# --------------------------------------------------------------------------------------------------------

_SAVED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class _Stored:
    """A saved tensor as this context holds it: the (possibly outer-packed) stored form and how to restore it."""

    __slots__ = ("__weakref__", "dtype", "handle")

    def __init__(self, handle: Any, dtype: torch.dtype | None) -> None:
        self.handle, self.dtype = handle, dtype

    @property
    def held(self) -> Any:
        """What holds the memory (the 16-bit copy, or the outer hooks' handle of it): for an enclosing meter."""
        return self.handle


def _memory_key(tensor: torch.Tensor) -> tuple:
    """What two tensor objects share when they are the same values in the same memory."""
    if tensor.layout != torch.strided:
        return ("id", id(tensor))
    return (tensor.untyped_storage().data_ptr(), tensor.device, tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


class saved_tensors_in:  # lower-case: a context manager used like a function, as torch.no_grad
    """Context manager: tensors saved for backward inside it are stored in ``dtype`` and restored on use.

    Floating-point saved tensors wider than ``dtype`` with at least ``min_numel`` elements are stored
    as ``tensor.to(dtype)``; the backward reads them back in their original dtype. Parameters (and views
    of them), integer and boolean tensors, sparse tensors (a graph's adjacency), and small tensors
    (per-channel statistics: they cost nothing, and rounding them would only add error) are kept as they
    are. A tensor saved by several ops (a ReLU output that the next conv saves too) is converted once and
    shared, as autograd shares the original.

    **Gradients become approximate**: every saved activation is rounded to 8 significant bits (bfloat16,
    relative error up to 2⁻⁸) or 11 bits (float16, 2⁻¹¹, with overflow above 65504), so the gradients
    carry relative errors of that order. The forward values are unchanged.

    It composes with an enclosing :class:`llkern.MemoryMeter` (or any other saved-tensor hooks entered
    before it): the converted tensor is handed to the outer pack hook, so the meter counts the bytes that
    are actually held. A meter entered inside it hands on to it in the same way (``with
    saved_tensors_in(torch.bfloat16): trainer.fit(...)``, whose trainer meters every epoch); other hooks entered
    inside it replace it.

    Example::

        with llkern.MemoryMeter(exclude=net.parameters()) as meter, saved_tensors_in(torch.bfloat16):
            net.local_step(x, y)
    """

    keeps_aliases = True  # (hooks inside it may hand it an op's output itself: llkern._saved_hooks.handed_on)

    def __init__(self, dtype: torch.dtype = torch.bfloat16, *, min_numel: int = 1024) -> None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"saved_tensors_in: expected dtype to be a torch.dtype, got {dtype!r} "
                            f"({type(dtype).__name__})")
        if dtype not in _SAVED_DTYPES:
            raise ValueError(f"saved_tensors_in: expected dtype to be torch.bfloat16, torch.float16 or torch.float32, "
                             f"got {dtype}")
        if isinstance(min_numel, bool) or not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"saved_tensors_in: expected min_numel to be a non-negative int, got {min_numel!r}")
        self.dtype, self.min_numel = dtype, min_numel
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        self._outer: tuple[Callable, Callable] | None = None
        # the original's memory (address, offset, shape, strides, dtype; its id where it has no strided storage) ->
        # (weakref to it, its version, weakref to the _Stored made for it): dedupes repeated saves of one tensor,
        # and of another tensor object over the same memory (``x.detach()``, saved by RecomputeInputConv2d where
        # BatchNormReLU saved ``x``), while the first lives; the weakrefs make reused memory or a changed tensor miss.
        self._shared: dict[tuple, tuple[weakref.ref, int, weakref.ref]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def _converts(self, tensor: torch.Tensor) -> bool:
        # (a sparse tensor, a graph's adjacency, is kept: it is data rather than an activation, and cast_pooled is
        # for strided memory)
        return (tensor.layout == torch.strided and tensor.is_floating_point() and tensor.element_size() > self._itemsize
                and tensor.numel() >= self.min_numel and not isinstance(tensor, nn.Parameter)
                and not isinstance(tensor._base, nn.Parameter))

    def _forget(self, key: tuple, ref: weakref.ref) -> None:
        entry = self._shared.get(key)
        if entry is not None and entry[0] is ref:
            del self._shared[key]

    def _pack(self, tensor: torch.Tensor) -> Any:
        outer_pack = self._outer[0] if self._outer is not None else None
        if not self._converts(tensor):
            if self._outer is not None:
                return _Stored(outer_pack(handed_on(self._outer, tensor)), None)
            # A detached alias of an op's output: the output itself would form a cycle (tensor -> grad_fn -> saved
            # handle -> tensor) through C++ that Python's gc cannot break, and the graph would never be freed.
            return tensor.detach() if tensor.grad_fn is not None else tensor
        key = _memory_key(tensor)
        entry = self._shared.get(key)
        first = entry[0]() if entry is not None else None
        # the first is alive (so its memory was not reused) and unchanged since it was converted
        if first is not None and entry[1] == first._version == tensor._version:
            stored = entry[2]()
            if stored is not None:
                return stored
        with torch.no_grad():
            low = cast_pooled(tensor.detach(), self.dtype)
        stored = _Stored(outer_pack(low) if outer_pack is not None else low, tensor.dtype)
        ref = weakref.ref(tensor, lambda r, key=key: self._forget(key, r))
        self._shared[key] = (ref, tensor._version, weakref.ref(stored))
        return stored

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Stored):
            return packed
        tensor = self._outer[1](packed.handle) if self._outer is not None else packed.handle
        return tensor if packed.dtype is None else cast_pooled(tensor, packed.dtype)

    def __enter__(self) -> saved_tensors_in:
        if self._hooks is not None:
            raise RuntimeError("saved_tensors_in: this context is already active (it is not reentrant)")
        self._outer = outer_saved_tensors_hooks()
        if self._outer is None and not can_see_outer_hooks():
            warnings.warn("saved_tensors_in: this PyTorch does not expose the enclosing saved-tensor hooks; "
                          "an enclosing MemoryMeter will not see the tensors saved inside", stacklevel=2)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        hooks, self._hooks = self._hooks, None
        hooks.__exit__(*exc)
        self._shared.clear()


# --------------------------------------------------------------------------------------------------------
# Converter
# --------------------------------------------------------------------------------------------------------


def _fusable_conv(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _leaves(seq: nn.Sequential) -> list[tuple[nn.Module, str, nn.Module]]:
    """(container, key, module) of the entries of ``seq`` in the order they run, nested plain Sequentials
    flattened (an entry's output is the next entry's input across their boundaries too)."""
    leaves = []
    for key, child in seq._modules.items():
        if type(child) is nn.Sequential:
            leaves += _leaves(child)
        elif child is not None:
            leaves.append((seq, key, child))
    return leaves


def _convert_bn_relu(module: nn.Module) -> None:
    plain = [m for m in module.modules() if type(m) is nn.Sequential]
    nested = {id(c) for m in plain for c in m.children() if type(c) is nn.Sequential}
    for root in (m for m in plain if id(m) not in nested):
        leaves = _leaves(root)
        i = 0
        while i + 1 < len(leaves):
            (bn_parent, bn_key, bn), (relu_parent, relu_key, relu) = leaves[i], leaves[i + 1]
            if type(bn) is not nn.BatchNorm2d or type(relu) is not nn.ReLU:
                i += 1
                continue
            bn_parent._modules[bn_key] = BatchNormReLU.from_batch_norm(bn)
            # An Identity keeps the indices (and so the state_dict keys) of the entries after it.
            relu_parent._modules[relu_key] = nn.Identity()
            i += 2
            if i < len(leaves) and _fusable_conv(leaves[i][2]):
                conv_parent, conv_key, conv = leaves[i]
                conv_parent._modules[conv_key] = RecomputeInputConv2d.from_conv(conv)
                i += 1


def convert(module: nn.Module, *, relu_masks: bool = False, bn_relu_recompute: bool = False) -> nn.Module:
    """Apply the activation-memory options to ``module`` in place (recursively); returns it.

    - ``bn_relu_recompute``: wherever an ``nn.BatchNorm2d`` is directly followed by an ``nn.ReLU`` in a
      plain ``nn.Sequential`` (nested plain Sequentials count as one sequence, so VGG's ``(conv, BN, ReLU)``
      units chain into each other), the BN becomes a :class:`BatchNormReLU` and the ReLU an
      ``nn.Identity``, and an ``nn.Conv2d`` right after them (zero padding) a :class:`RecomputeInputConv2d`,
      so that the three save only the BN's input. Only ``nn.Sequential`` itself is searched: a subclass
      with its own ``forward`` may not call its entries in order.
    - ``relu_masks``: every remaining ``nn.ReLU`` module becomes a :class:`BitMaskReLU`.

    Parameter and buffer tensors are the same objects as before (an optimizer built earlier keeps
    working), and ``state_dict`` keys are unchanged. Both options are exact, and both run on llkern's
    compiled ops (``relu_with_mask``, ``batch_norm_relu``) when the extension is built for the device.

    Functional ReLUs (``F.relu`` or ``torch.relu`` called in a ``forward``) are not reached: such a call
    is not a module that can be swapped, and rewriting it would mean tracing the ``forward`` (torch.fx),
    which fails on data-dependent control flow and replaces the user's class with generated code. Write
    the ReLU as an ``nn.ReLU`` submodule (llkern's models do, ResNet's block entries included) or call
    :func:`bitmask_relu` directly. Hooks registered on replaced modules are not carried over. When ``module``
    itself is an ``nn.ReLU`` and ``relu_masks`` is set, the replacement is returned.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: expected module to be an nn.Module, got {type(module).__name__}")
    for name, value in (("relu_masks", relu_masks), ("bn_relu_recompute", bn_relu_recompute)):
        if not isinstance(value, bool):
            raise TypeError(f"convert: expected {name} to be a bool, got {value!r}")
    if relu_masks and type(module) is nn.ReLU:
        return BitMaskReLU(module.inplace)
    if bn_relu_recompute:
        _convert_bn_relu(module)
    if relu_masks:
        for sub in list(module.modules()):
            for name, child in sub._modules.items():
                if type(child) is nn.ReLU:
                    sub._modules[name] = BitMaskReLU(child.inplace)
    return module
