"""cast_pooled: ``x.to(dtype)`` into a CPU buffer from llkern's pool of large buffers.

Declared in csrc/ops.cpp, implemented in csrc/bindings/cast_cpu.cpp (ATen's conversion loop; the
op's point is the destination). :class:`llkern.nn.activation_memory.saved_tensors_in` stores saved
activations through it and restores them through it: a fresh activation-sized allocation costs its
page faults at every call, 3 to 5 times the conversion itself on a CPU (bench/results). Not
differentiable: it converts tensors that autograd has already saved.
"""

from __future__ import annotations

import torch

from llkern._ext import extension_loaded, kernel_available


def cast_pooled(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` (always a new tensor), into a pooled buffer on the CPU when llkern._C is built."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"llkern.cast_pooled: expected x to be a Tensor, got {type(x).__name__}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"llkern.cast_pooled: expected dtype to be a torch.dtype, got {dtype!r}")
    if (x.device.type == "cpu" and x.layout == torch.strided and kernel_available("cast_pooled", "cpu")
            and not torch.compiler.is_compiling()):
        return torch.ops.llkern.cast_pooled(x, dtype)
    return x.to(dtype, copy=True)  # (elsewhere, and for sparse layouts, which the pool does not hold)


if extension_loaded():

    @torch.library.register_fake("llkern::cast_pooled")
    def _fake(x, dtype):
        return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format) if x.is_contiguous() \
            else torch.empty_like(x, dtype=dtype)
