"""Context-supply add (ContSup): ``out = h + Σ_i avgpool_{s_i}(c_i)``, fused, with its backward.

Each context ``c_i`` is ``(B, C, s_i·H, s_i·W)`` for ``h`` of ``(B, C, H, W)`` (s_i = 1, 2, 4, ...);
its s×s average pooling is fused into the add, and the backward gives every context its gradient
``upsample(g) / s²`` in one pass over g. NCHW and channels_last (any strides). The Triton kernels
are in triton_kernels/context_add.py (``llkern.triton_kernels``); ``torch.ops.llkern.context_add``
and ``context_add_backward`` are ``torch.library.triton_op``s, so torch.compile sees them.

The kernels run on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 is set before they
are first used (the tests); elsewhere ``impl="auto"`` takes the plain-PyTorch reference.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from llkern._ext import IMPLS, device_guard

__all__ = ["context_add", "context_add_reference", "triton_available", "use_triton"]

NAME = "llkern.context_add"


# Asked once at import: Dynamo refuses to trace the import system's find_spec inside a compiled region.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device``: triton is installed and the device is a
    GPU, or the Triton interpreter is on (TRITON_INTERPRET=1, set before llkern's kernels were first
    imported: Triton reads it when a kernel is defined)."""
    if not _TRITON_INSTALLED:
        return False
    if device.type == "cuda":
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    kernels = sys.modules.get("llkern.triton_kernels")
    return kernels is None or kernels.INTERPRETED


_warned: set[tuple[str, str]] = set()


def use_triton(name: str, device: torch.device, impl: str) -> bool:
    """Resolve ``impl`` for a Triton op: True to run the kernel. ``"auto"`` takes the PyTorch reference where
    the kernel cannot run, saying so once per op and device, except on the CPU without ``TRITON_INTERPRET=1``
    (there the reference is the implementation); ``"kernel"`` raises."""
    if impl not in IMPLS:
        raise ValueError(f"{name}: expected impl to be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    if triton_available(device):
        return True
    if not _TRITON_INSTALLED:
        why = "triton is not installed"
    elif device.type == "cpu":
        why = ("its Triton kernel runs on CUDA tensors, or on CPU tensors in Triton's interpreter "
               "(TRITON_INTERPRET=1, set before llkern's kernels are first used)")
    else:
        why = f"its Triton kernel does not run on {device.type} tensors"
    if impl == "kernel":
        raise RuntimeError(f"{name}: impl='kernel' but {why}")
    # On the CPU, only a user who asked for the interpreter (too late: see triton_available) hears about it.
    quiet = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"
    if not quiet and (name, device.type) not in _warned and not torch.compiler.is_compiling():
        _warned.add((name, device.type))
        warnings.warn(f"{name}: {why}; using the PyTorch reference.", stacklevel=3)
    return False


def _channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _scale(h: torch.Tensor, c: object, i: int) -> int:
    """s of context i, with clear errors for anything that is not (B, C, s·H, s·W) like h."""
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{NAME}: expected contexts[{i}] to be a Tensor, got {type(c).__name__}")
    if c.dtype != h.dtype or c.device != h.device:
        raise ValueError(f"{NAME}: expected contexts[{i}] with the dtype and device of h ({h.dtype}, {h.device}), "
                         f"got {c.dtype}, {c.device}")
    batch, channels, height, width = h.shape
    ok = c.dim() == 4 and c.shape[0] == batch and c.shape[1] == channels and c.shape[2] >= height \
        and c.shape[2] % height == 0
    s = c.shape[2] // height if ok else 0
    if not ok or c.shape[3] != s * width:
        raise ValueError(f"{NAME}: expected contexts[{i}] of shape (B, C, s·H, s·W) = ({batch}, {channels}, "
                         f"s·{height}, s·{width}) for an integer s >= 1, got {list(c.shape)}")
    return s


def _check(h: object, contexts: tuple) -> list[int]:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{NAME}: expected h to be a Tensor, got {type(h).__name__}")
    if not h.is_floating_point():
        raise TypeError(f"{NAME}: expected h to be a floating-point tensor, got {h.dtype}")
    if h.dim() != 4:
        raise ValueError(f"{NAME}: expected h of shape (B, C, H, W), got {list(h.shape)}")
    if h.numel() == 0:
        raise ValueError(f"{NAME}: expected a non-empty h, got shape {list(h.shape)}")
    if not contexts:
        raise ValueError(f"{NAME}: expected at least one context tensor")
    return [_scale(h, c, i) for i, c in enumerate(contexts)]


def context_add_reference(h: torch.Tensor, *contexts: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: ``h + Σ avg_pool2d(c_i, s_i)`` (accumulated in h's dtype)."""
    scales = _check(h, contexts)
    out = h
    for c, s in zip(contexts, scales, strict=True):
        out = out + (c if s == 1 else F.avg_pool2d(c, s))
    return out


def context_add(h: torch.Tensor, *contexts: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``h + Σ_i avgpool_{s_i}(c_i)`` in one pass (Triton), each context at s_i× h's spatial size.

    Args:
        h: ``(B, C, H, W)``, typically a module's detached input (a boundary).
        *contexts: ``(B, C, s·H, s·W)`` tensors (s an integer ≥ 1 per context), the dtype and device
            of h: context encoders' outputs. Each gets the gradient ``upsample(g) / s²``.
        impl: ``"auto"`` (the Triton kernel where it can run, see :func:`triton_available`, else
            PyTorch), ``"kernel"`` (Triton, or an error) or ``"reference"``.

    Returns:
        A tensor like h (same memory format), accumulated in float32 (float64 for float64).
    """
    _check(h, contexts)
    if not use_triton(NAME, h.device, impl):
        return context_add_reference(h, *contexts)
    return torch.ops.llkern.context_add(h, list(contexts))


# --- the ops torch.library sees ------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _pairs(items: list) -> list[list]:
    return [items[i:i + 2] for i in range(0, len(items), 2)]


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _launches(t: torch.Tensor) -> tuple[list[tuple[tuple[int, int], int]], int]:
    """The launches ((grid, first tile) each: rows of the memory order × tiles of a row, at most
    MAX_TILES tiles a launch) and the tile size, for a (B, C, H, W) tensor in NCHW or channels_last order."""
    from llkern.triton_kernels import context_add as kernels

    batch, channels, height, width = t.shape
    rows, row_len = (batch * height, width * channels) if _channels_last(t) else (batch * channels, height * width)
    block = kernels.block_for(row_len)
    tiles = (row_len + block - 1) // block
    return [((rows, min(kernels.MAX_TILES, tiles - t0)), t0) for t0 in range(0, tiles, kernels.MAX_TILES)], block


@torch.library.triton_op("llkern::context_add", mutates_args=())
def _context_add_op(h: torch.Tensor, contexts: list[torch.Tensor]) -> torch.Tensor:
    from llkern.triton_kernels import context_add as kernels

    _, channels, height, width = h.shape
    out = torch.empty_like(h)
    launches, block = _launches(out)
    pairs = _pairs(contexts)
    # Two contexts per launch. With more, the partial sums stay in the accumulation dtype between
    # launches (a 16-bit out would round each one), and the last launch writes out.
    partial = out if len(pairs) == 1 else torch.empty_like(h, dtype=_acc_dtype(h.dtype))
    base = h
    for i, pair in enumerate(pairs):
        first, second = pair[0], pair[-1]
        target = out if i == len(pairs) - 1 else partial
        with device_guard(h):
            for grid, tile0 in launches:
                torch.library.wrap_triton(kernels.context_add_forward)[grid](
                    base, first, second, target, channels, height, width, tile0,
                    *_strides(base), *_strides(first), *_strides(second), *_strides(target),
                    S1=first.shape[2] // height, S2=second.shape[2] // height, NUM_CONTEXTS=len(pair),
                    CHANNELS_LAST=_channels_last(out), ACC=_acc(h.dtype), BLOCK=block)
        base = target
    return out


@torch.library.triton_op("llkern::context_add_backward", mutates_args=())
def _context_add_backward_op(grad: torch.Tensor, scales: list[int], channels_last: list[bool]) -> list[torch.Tensor]:
    from llkern.triton_kernels import context_add as kernels

    batch, channels, height, width = grad.shape
    grads = [torch.empty((batch, channels, s * height, s * width), dtype=grad.dtype, device=grad.device,
                         memory_format=torch.channels_last if last else torch.contiguous_format)
             for s, last in zip(scales, channels_last, strict=True)]
    launches, block = _launches(grad)
    for pair, pair_scales in zip(_pairs(grads), _pairs(list(scales)), strict=True):
        first, second = pair[0], pair[-1]
        with device_guard(grad):
            for grid, tile0 in launches:
                torch.library.wrap_triton(kernels.context_add_backward)[grid](
                    grad, first, second, channels, height, width, tile0,
                    *_strides(grad), *_strides(first), *_strides(second),
                    S1=pair_scales[0], S2=pair_scales[-1], NUM_CONTEXTS=len(pair),
                    CHANNELS_LAST=_channels_last(grad), ACC=_acc(grad.dtype), BLOCK=block)
    return grads


# Shapes only: under fake tensors (opcheck, torch.compile's tracing) no kernel may launch, and
# Triton's interpreter would try to on the CPU.
@_context_add_op.register_fake
def _context_add_fake(h, contexts):
    return torch.empty_like(h)


@_context_add_backward_op.register_fake
def _context_add_backward_fake(grad, scales, channels_last):
    batch, channels, height, width = grad.shape
    return [torch.empty((batch, channels, s * height, s * width), dtype=grad.dtype, device=grad.device,
                        memory_format=torch.channels_last if last else torch.contiguous_format)
            for s, last in zip(scales, channels_last, strict=True)]


def _setup_context(ctx, inputs, output):
    h, contexts = inputs
    height = h.shape[2]
    ctx.scales = [c.shape[2] // height for c in contexts]
    ctx.channels_last = [_channels_last(c) for c in contexts]


def _backward(ctx, grad):
    grads = torch.ops.llkern.context_add_backward(grad, ctx.scales, ctx.channels_last)  # any strides
    return grad, list(grads)


_context_add_op.register_autograd(_backward, setup_context=_setup_context)
