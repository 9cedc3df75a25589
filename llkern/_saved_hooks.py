"""The saved-tensor hooks active at a point, so that hooks entered inside them can hand on to them.

Only the innermost ``torch.autograd.graph.saved_tensors_hooks`` pair runs: a :class:`llkern.MemoryMeter` entered
inside :class:`llkern.activation_memory.saved_tensors_in` (or the other way round) would otherwise switch the
outer one off. Each of llkern's hooks captures the pair below it on entry and passes every saved tensor on to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def outer_saved_tensors_hooks() -> tuple[Callable, Callable] | None:
    """The (pack, unpack) pair active now, or None (none active, or a PyTorch that does not expose it).

    PyTorch exposes the top of its hook stack only privately; without it there is no composition.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    try:
        return top(False)
    except TypeError:  # older signature without ``ignore_is_tracing``
        return top()


def can_see_outer_hooks() -> bool:
    return getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None) is not None


def held_tensor(handle: object) -> torch.Tensor | None:
    """The tensor an outer pack hook's handle holds in memory: the handle itself, or what llkern's handles
    (saved_tensors_in's 16-bit copy, a meter's alias) expose as ``held``; None for an opaque handle."""
    while not isinstance(handle, torch.Tensor):
        handle = getattr(handle, "held", None)
        if handle is None:
            return None
    return handle
