"""Activation-memory meter: peak bytes of tensors saved for backward, counted per storage.

The same storage is often saved by several ops (a conv's output by the BatchNorm after it
and by a view); summing per tensor double-counts, so the meter counts each *distinct
storage* once, from the first save until the last saved reference to it is released by
autograd. Parameters (and anything passed as ``exclude``) are not counted. On CUDA it also
reports ``torch.cuda.max_memory_allocated`` above the level at entry.

Example::

    with MemoryMeter(exclude=model.parameters()) as meter:
        loss = model(x).sum(); loss.backward()
    print(meter.peak_saved_bytes)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from llkern._saved_hooks import handed_on, held_tensor, outer_saved_tensors_hooks


class _Saved:
    """What autograd holds instead of a saved tensor while the meter is active: the tensor (a detached alias), or the
    handle the hooks outside the meter made of it, with ``unpack`` theirs."""

    __slots__ = ("__weakref__", "keys", "meter", "tensor", "unpack")

    def __init__(self, meter: MemoryMeter, keys: list[tuple], tensor: Any, unpack: Callable | None = None) -> None:
        self.meter, self.keys, self.tensor, self.unpack = meter, keys, tensor, unpack

    @property
    def held(self) -> Any:
        """What holds the memory: for a meter enclosing this one."""
        return self.tensor

    def __del__(self) -> None:
        for key in self.keys:
            self.meter._drop(key)


@dataclass
class MemoryReport:
    """Peaks of one measured region (bytes). ``cuda_peak_bytes`` is None off CUDA."""

    peak_saved_bytes: int
    cuda_peak_bytes: int | None = None

    def __str__(self) -> str:
        text = f"saved-for-backward peak {self.peak_saved_bytes / 2**20:.2f} MiB"
        if self.cuda_peak_bytes is not None:
            text += f", CUDA allocated peak {self.cuda_peak_bytes / 2**20:.2f} MiB above baseline"
        return text


def _components(t: torch.Tensor) -> list[torch.Tensor]:
    """The dense tensors holding ``t``'s memory: itself, or a sparse tensor's indices and values."""
    if t.layout == torch.strided:
        return [t]
    if t.layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return []  # a layout without storages to count


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    # A meta storage has no data (its data_ptr() is 0 for all of them): tell them apart by the storage object.
    address = storage._cdata if t.device.type == "meta" else storage.data_ptr()
    return (t.device.type, t.device.index, address)


class MemoryMeter:
    """Context manager measuring the peak bytes of distinct storages saved for backward.

    Entered inside other saved-tensor hooks (:class:`llkern.activation_memory.saved_tensors_in`, another meter), it
    hands every saved tensor on to them, so both work wherever the meter is entered (``LocalTrainer`` enters one for
    every epoch). It counts what llkern's hooks hold (the 16-bit copy ``saved_tensors_in`` keeps); under hooks that
    do not say what they hold (``torch.autograd.graph.save_on_cpu``), the tensor it was given.

    Args:
        exclude: tensors (typically ``model.parameters()``) whose storages are not counted;
            ``nn.Parameter`` objects are never counted.
        device: a CUDA device to also track ``max_memory_allocated`` on (default: the current
            CUDA device when CUDA is available).
    """

    keeps_aliases = True  # (hooks inside it may hand it an op's output itself: llkern._saved_hooks.handed_on)

    def __init__(self, exclude: Iterable[torch.Tensor] = (), device: torch.device | str | None = None) -> None:
        self._excluded = {_storage_key(c) for t in exclude
                          if not isinstance(t, torch.nn.parameter.UninitializedParameter) for c in _components(t)}
        self._counts: dict[tuple, int] = {}
        self._sizes: dict[tuple, int] = {}
        self.current_saved_bytes = 0
        self.peak_saved_bytes = 0
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        self._cuda = torch.device(device) if device is not None and torch.device(device).type == "cuda" else None
        self._cuda_baseline = 0
        self.cuda_peak_bytes: int | None = None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._outer: tuple[Callable, Callable] | None = None  # the hooks outside, while active
        self._entries: list[tuple[Callable, Callable] | None] = []  # the outer hooks of enclosing entries of this one

    def _pack(self, tensor: torch.Tensor):
        outer = self._outer
        handle = tensor if outer is None else outer[0](handed_on(outer, tensor))
        if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
            # a parameter or a view of one (nn.Linear saves weight.t())
            return handle if outer is None else _Saved(self, [], handle, outer[1])
        held = tensor if outer is None else held_tensor(handle)
        if held is None:  # an outer handle that does not say what it holds: count the tensor given
            held = tensor
        keys = []
        for part in _components(held):  # a sparse tensor counts its index and value storages
            key = _storage_key(part)
            nbytes = part.untyped_storage().nbytes()
            if key in self._excluded or nbytes == 0:
                continue
            count = self._counts.get(key, 0)
            if count == 0:
                self._sizes[key] = nbytes
                self.current_saved_bytes += nbytes
                self.peak_saved_bytes = max(self.peak_saved_bytes, self.current_saved_bytes)
            self._counts[key] = count + 1
            keys.append(key)
        if outer is not None:
            return _Saved(self, keys, handle, outer[1])
        if not keys:
            return tensor
        # Hold a detached alias: an op's saved output would otherwise form a cycle (tensor ->
        # grad_fn -> saved handle -> tensor) through C++ that Python's gc cannot break.
        return _Saved(self, keys, tensor.detach())

    @staticmethod
    def _unpack(handle):
        if not isinstance(handle, _Saved):
            return handle
        return handle.tensor if handle.unpack is None else handle.unpack(handle.tensor)

    def _drop(self, key: tuple) -> None:
        count = self._counts[key] - 1
        if count == 0:
            del self._counts[key]
            self.current_saved_bytes -= self._sizes.pop(key)
        else:
            self._counts[key] = count

    def reset_peak(self) -> None:
        """Restart the peaks from the current level."""
        self.peak_saved_bytes = self.current_saved_bytes
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
            torch.cuda.reset_peak_memory_stats(self._cuda)
            self._cuda_baseline = torch.cuda.memory_allocated(self._cuda)

    def __enter__(self) -> MemoryMeter:
        self.reset_peak()
        outer = outer_saved_tensors_hooks()
        if outer is not None and getattr(outer[0], "__self__", None) is self:
            outer = self._outer  # entered again inside itself: hand on to what its first entry found
        self._entries.append(self._outer)
        self._outer = outer
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._outer = self._entries.pop()
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated(self._cuda) - self._cuda_baseline

    def report(self) -> MemoryReport:
        return MemoryReport(self.peak_saved_bytes, self.cuda_peak_bytes)


def cpu_buffer_cache_bytes() -> int:
    """Bytes held by llkern's cache of large CPU buffers (0 without the compiled extension).

    llkern's CPU kernels take large outputs (gradients of several MiB) from a cache of
    huge-page-backed blocks that are reused step after step instead of being returned to the
    system, which saves the page faults and the zeroing of fresh memory. The cache holds at most
    ``LLKERN_CPU_CACHE_MB`` MiB (default 256).
    """
    from llkern._ext import extension_loaded

    return int(torch.ops.llkern.cpu_buffer_cache_bytes()) if extension_loaded() else 0


def empty_cpu_buffer_cache() -> None:
    """Free the blocks of llkern's CPU buffer cache (like ``torch.cuda.empty_cache``)."""
    from llkern._ext import extension_loaded

    if extension_loaded():
        torch.ops.llkern.empty_cpu_buffer_cache()
