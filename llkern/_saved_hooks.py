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
    for _ in range(16):  # (nested hooks rarely go deeper; a ``held`` that never ends in a tensor must not hang)
        if isinstance(handle, torch.Tensor):
            return handle
        handle = getattr(handle, "held", None)
        if handle is None:
            return None
    return None


def handed_on(outer: tuple[Callable, Callable], tensor: torch.Tensor) -> torch.Tensor:
    """What to give the outer pack hook for ``tensor``: the tensor itself when the outer hooks are llkern's (they keep
    a detached alias themselves, and ``saved_tensors_in`` recognises a tensor saved twice by the object's lifetime),
    else a detached alias of an op's output. Hooks that keep what they are given would otherwise close a cycle
    (tensor -> grad_fn -> handle -> tensor) that Python's gc cannot break: the graph would never be freed."""
    if tensor.grad_fn is None or getattr(getattr(outer[0], "__self__", None), "keeps_aliases", False):
        return tensor
    return tensor.detach()
