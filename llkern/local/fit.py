"""Fit local training into an activation-memory budget: the fewest modules, then the fewest recomputed segments.

Local training's activation memory is that of its largest module, and recomputed segments
(:func:`llkern.recompute_segments`) shrink a module further at the cost of a second forward. :func:`fit_memory`
searches the two knobs for a model and batch: K = 1, 2, ... modules (:func:`llkern.split`, balanced by saved
bytes), and for each K the segment counts given, until the largest module's measured saved-for-backward peak
(forward and backward, recomputation included) fits the budget. Fewer modules come first because every module
boundary stops the gradient (accuracy), fewer segments second because each costs time.

The measurement runs each candidate's modules as LocalNet runs them (each on the previous module's detached output,
in training mode), inside :class:`llkern.MemoryMeter`; modes, buffers (BatchNorm statistics), gradients and the RNG
are left as they were (lazy modules get their shapes in the first measurement, and lazy norm layers' statistics are
reset to their initial values after it). The cuts of recomputed segments balance the per-layer saved bytes of the
same measurement. Activations grow linearly with the batch, some saved tensors not at all (a pruned or
weight-normed weight): each candidate runs on ``example_input`` and on its first half, and every point of its saved
bytes through forward and backward is extrapolated on its own line to ``batch_size`` (an example batch under 4 is
scaled in proportion instead, which overstates what does not grow). The budget is for saved activations only:
parameters, gradients, optimizer state, the heads (small for pooled heads; a language model's token head is not),
and on a GPU the allocator's workspace and fragmentation come on top. With ``autocast=torch.bfloat16`` the 16-bit
copies autocast saves are what is fitted (about half of fp32's for a convolutional network), the cuts made as in
fp32; called under ``torch.autocast``, everything runs under it, the cuts included. ``saved_dtype=torch.bfloat16``
fits the copies :class:`llkern.activation_memory.saved_tensors_in` stores, in the same way. ``transform`` fits the
modules as another option changes them (``llkern.activation_memory.convert``: 1-bit ReLU masks, BatchNorm+ReLU
recomputed).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from llkern.local.memory import MemoryMeter
from llkern.local.net import _autocast
from llkern.local.planner import (
    SplitPlan,
    TooManyModulesError,
    _format_bytes,
    _trainable,
    _TrainModeNoSideEffects,
    split,
)

__all__ = ["MemoryFit", "fit_memory"]


@dataclass
class MemoryFit:
    """The result of :func:`fit_memory`.

    Attributes:
        k: the number of modules.
        segments: recomputed segments per module (1: none; a module allowing fewer cuts has fewer).
        modules: the K modules to give :class:`llkern.LocalNet` (``plan.modules``, transformed when ``transform``
            was given, recomputed where ``segments > 1``); they share the model's parameters.
        plan: the :class:`llkern.SplitPlan` of the K modules.
        peak_bytes: the largest module's saved-for-backward peak, predicted for ``batch_size``.
        module_peaks: every module's, predicted for ``batch_size``.
        batch_size: the batch the prediction is for.
        budget_bytes: the budget.
        tried: ``(k, segments, predicted peak bytes)`` of every candidate measured, in order.
        rejected: ``(k, segments)`` of the candidates within the budget that ``accept`` refused.
    """

    k: int
    segments: int
    modules: list[nn.Module]
    plan: SplitPlan
    peak_bytes: int
    module_peaks: list[int]
    batch_size: int
    budget_bytes: int
    tried: list[tuple[int, int, int]] = field(default_factory=list)
    rejected: list[tuple[int, int]] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [f"fit_memory: K = {self.k} module{'s' if self.k > 1 else ''}, {self.segments} recomputed segment"
                f"{'s' if self.segments > 1 else ''} per module; largest module {_format_bytes(self.peak_bytes)} "
                f"saved for a batch of {self.batch_size} (budget {_format_bytes(self.budget_bytes)})",
                "   K  segments  largest module  of budget"]
        # the share of the budget, rounded up: a candidate 1 byte over shows above 100 %, not as "3.00 MiB" beside a
        # budget of 3.00 MiB
        rows += [f"{k:4d}  {s:8d}  {_format_bytes(peak):>14}  {math.ceil(1000 * peak / self.budget_bytes) / 10:7.1f} %"
                 f"{_verdict(peak <= self.budget_bytes, (k, s) in self.rejected)}" for k, s, peak in self.tried]
        return "\n".join(rows)


class _TraceMeter(MemoryMeter):
    """A MemoryMeter that also records the saved bytes after every save and release (its ``trace``)."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        super().__init__(exclude=exclude, device="cpu")
        self.trace = [0]

    def _pack(self, tensor: torch.Tensor):
        handle = super()._pack(tensor)
        self.trace.append(self.current_saved_bytes)
        return handle

    def _drop(self, key: tuple) -> None:
        super()._drop(key)
        self.trace.append(self.current_saved_bytes)


def _module_traces(modules: list[nn.Module], example_input: torch.Tensor) -> list[list[int]]:
    """Each module's saved bytes after every save and release over its forward and backward, run as LocalNet
    runs it (on the previous module's detached output)."""
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    traces, h = [], example_input.detach()
    with torch.enable_grad():
        for module in modules:
            trainable = [p for p in module.parameters() if p.requires_grad]
            meter = _TraceMeter(exclude=params)
            with meter:
                out = module(h)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"fit_memory: expected every module to return a tensor, got "
                                    f"{type(out).__name__}")
                if out.requires_grad and trainable:  # gradients returned, not accumulated into .grad
                    torch.autograd.grad(out, trainable, torch.ones_like(out), allow_unused=True)
            h = out.detach()
            del out  # a module that recorded nothing to differentiate: its saved tensors are released here
            traces.append(meter.trace)
    return traces


def _inside_saved_tensors_in() -> bool:
    from llkern._saved_hooks import outer_saved_tensors_hooks
    from llkern.nn.activation_memory import saved_tensors_in

    hooks = outer_saved_tensors_hooks()
    return hooks is not None and isinstance(getattr(hooks[0], "__self__", None), saved_tensors_in)


def _saved_in(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    from llkern.nn.activation_memory import saved_tensors_in  # llkern.nn imports llkern.local lazily the other way

    return contextlib.nullcontext() if dtype is None else saved_tensors_in(dtype)


def _verdict(fits: bool, rejected: bool) -> str:
    return "" if not fits else "  fits, not accepted" if rejected else "  fits"


def _predicted_peak(trace: list[int], half: list[int] | None, batch: int, batch_size: int) -> int:
    """The peak of ``trace`` (measured on ``batch`` samples) predicted for ``batch_size``. With the same run's trace
    on ``batch // 2`` samples, every point is extrapolated on its own line through the two (a weight saved whatever
    the batch, as a pruned or weight-normed one, does not grow); without it, the peak is scaled in proportion."""
    if batch_size == batch:
        return max(trace)
    if half is None or len(half) != len(trace):
        return round(max(trace) * batch_size / batch)
    slope = (batch_size - batch) / (batch - batch // 2)
    return max(0, round(max(a + (a - b) * slope for a, b in zip(trace, half, strict=True))))


def _module_costs(plan: SplitPlan, example_input: torch.Tensor) -> tuple[list[list[int]], list[list[bool]]]:
    """Each module's per-child saved bytes and in-place flags, as :func:`llkern.recompute_modules` measures them,
    mostly from the plan's measurement of the whole chain. Only a module's first children differ there: its input
    is detached in local training, so the children up to its first trainable one (and any layer inside that one
    before its first parameter: a pool in ``Sequential(MaxPool2d, Conv2d, ReLU)``) record no graph. Those are
    measured again on the module's own input (the batch run through the modules before it in eval mode)."""
    from llkern.nn.recompute import _eval_forward, _measure  # llkern.nn imports llkern.local lazily the other way

    costs, writes = [], []
    h = example_input
    for k, (lo, hi) in enumerate(itertools.pairwise(plan.boundaries)):
        module = plan.modules[k]
        units = list(module)
        module_costs = list(plan.unit_costs[lo:hi])
        # a write by a later module's unit is harmless here: this module's backward has run by then
        module_writes = [w is not None and w < hi for w in plan.unit_input_writers[lo:hi]]
        first = next((i for i, unit in enumerate(units) if _trainable(unit)), len(units) - 1)
        head_costs, head_writes = _measure(nn.Sequential(*units[:first + 1]), h)
        module_costs[:first + 1] = head_costs
        module_writes[:first + 1] = [a or b for a, b in zip(module_writes[:first + 1], head_writes, strict=True)]
        costs.append(module_costs)
        writes.append(module_writes)
        if k + 1 < len(plan.modules):
            h = _eval_forward(module, h)
    return costs, writes


def _transformed(modules: list[nn.Module], transform: Callable[[nn.Module], nn.Module | None]) -> list[nn.Module]:
    """Copies of ``modules`` passed through ``transform``: the copies share the modules' parameter and buffer tensors
    (what is trained and the statistics are the model's), while ``transform`` may replace their layers without
    changing the model (the next K is cut from it as it was)."""
    # Tensors held as plain attributes are shared too: a weight that weight_norm, spectral_norm or pruning computes
    # from its parameters in a forward pre-hook (deepcopy refuses a tensor that is not a graph leaf; the hook sets the
    # copy's own on its first forward).
    shared = {id(t): t for m in modules for sub in m.modules()
              for t in itertools.chain(sub.parameters(recurse=False), sub.buffers(recurse=False),
                                       (v for v in vars(sub).values() if isinstance(v, torch.Tensor)))}
    out = []
    for k, module in enumerate(copy.deepcopy(list(modules), shared)):
        with torch.random.fork_rng(devices=[]):  # a transform that creates layers leaves the RNG as it was
            result = transform(module)
        result = module if result is None else result
        if not isinstance(result, nn.Module):
            raise TypeError(f"fit_memory: expected transform to return an nn.Module (or None: changed in place), got "
                            f"{type(result).__name__} for module {k}")
        out.append(result)
    return out


def _own_costs(modules: list[nn.Module], example_input: torch.Tensor) -> tuple[list[list[int]], list[list[bool]]]:
    """Each module's per-child saved bytes and in-place flags, measured on its own input as
    :func:`llkern.recompute_modules` measures them (for modules a transform changed: the plan's bytes are the
    untransformed layers')."""
    from llkern.nn.recompute import _check_sequential, _eval_forward, _measure, _plain

    costs, writes, h = [], [], example_input
    for k, module in enumerate(modules):
        try:
            _check_sequential(module)
        except TypeError as error:
            raise TypeError(f"fit_memory: transform returned module {k} as a {type(module).__name__}, which cannot "
                            "be cut into recomputed segments; return the nn.Sequential (changed in place), or give "
                            "segments=(1,)") from error
        module_costs, module_writes = _measure(_plain(module), h)
        costs.append(module_costs)
        writes.append(module_writes)
        if k + 1 < len(modules):
            h = _eval_forward(module, h)
    return costs, writes


def fit_memory(model: nn.Module, budget_bytes: int, *, example_input: torch.Tensor, batch_size: int | None = None,
               min_k: int = 1, max_k: int = 16, segments: tuple[int, ...] = (1, 2, 3, 4),
               transform: Callable[[nn.Module], nn.Module | None] | None = None, autocast: torch.dtype | None = None,
               saved_dtype: torch.dtype | None = None,
               accept: Callable[[list[nn.Module]], bool] | None = None) -> MemoryFit:
    """The fewest modules (then the fewest recomputed segments) whose largest module fits ``budget_bytes``.

    Args:
        model: what :func:`llkern.split` takes (an ``nn.Sequential``, a list of modules, a model with
            ``split_units()`` or one ``torch.fx`` traces), without its classifier: LocalNet's heads classify.
        budget_bytes: the saved-activation bytes one module may hold in its step (a positive int).
        example_input: a batch for the model; the measurements run on it.
        batch_size: the training batch the budget is for (default: ``example_input``'s); the bytes measured on
            ``example_input`` and on its first half are extrapolated to it (with fewer than 4 examples: scaled by
            ``batch_size / len(example_input)``).
        min_k: the fewest modules to try (a pipeline of S stages needs at least S).
        max_k: the most modules to try.
        segments: the segment counts to try for each K, in order (1: no recomputation).
        transform: applied to each module of every candidate after the cut and before recomputation, as training
            will apply it; what is measured and returned is the transformed modules. For the other options of
            :mod:`llkern.activation_memory`: ``lambda m: convert(m, relu_masks=True, bn_relu_recompute=True)``.
            It gets a copy of the module whose parameter and buffer tensors are the model's, so it may change it
            in place (returning None) or return a new module; the model itself is left as it was. The cut is
            balanced by the untransformed layers' bytes (as :func:`llkern.split` followed by ``convert`` cuts it).
        autocast: a dtype (``torch.bfloat16``, ``torch.float16``) for training under autocast
            (``LocalTrainer(precision="bf16")``, ``LocalNet.local_step(autocast=...)``): each candidate's saved bytes
            are measured with its modules run under ``torch.autocast`` on ``example_input``'s device, while the cuts
            balance the bytes measured without it, as ``split`` and ``recompute_modules`` called outside autocast cut
            (so a training script that cuts that way gets the modules fitted). Calling fit_memory under
            ``torch.autocast`` instead runs everything under it, the cuts included.
        saved_dtype: a dtype (``torch.bfloat16``, ``torch.float16``) for training inside
            ``llkern.activation_memory.saved_tensors_in(saved_dtype)``: each candidate's saved bytes are measured with
            the copies it stores, the cuts made as in fp32 (as with ``autocast``).
        accept: a further check of each candidate within the budget, called with its modules (outside inference
            mode); the search goes on past one it returns False for. For what fit_memory does not measure: the heads
            and local losses (``llkern train --memory-budget`` runs a copy with them).

    Returns:
        a :class:`MemoryFit`; ``llkern.LocalNet(fit.modules, num_classes=...)`` trains it.

    Raises:
        ValueError: for a bad argument, or when no candidate up to ``max_k`` modules fits (the message gives the
            least peak found and what to try).
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"fit_memory: expected budget_bytes to be a positive int, got {budget_bytes!r}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() == 0 or len(example_input) == 0:
        raise TypeError("fit_memory: expected example_input to be a tensor holding a non-empty batch, got "
                        + (f"shape {tuple(example_input.shape)}" if isinstance(example_input, torch.Tensor)
                           else type(example_input).__name__))
    batch = len(example_input)
    if batch_size is None:
        batch_size = batch
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"fit_memory: expected batch_size to be a positive int, got {batch_size!r}")
    if isinstance(min_k, bool) or not isinstance(min_k, int) or min_k < 1:
        raise ValueError(f"fit_memory: expected min_k to be an int >= 1, got {min_k!r}")
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < min_k:
        raise ValueError(f"fit_memory: expected max_k to be an int >= min_k ({min_k}), got {max_k!r}")
    segments = tuple(segments)
    if not segments or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in segments):
        raise ValueError(f"fit_memory: expected segments to be ints >= 1, got {segments!r}")
    if autocast not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"fit_memory: expected autocast to be None, torch.bfloat16 or torch.float16, got {autocast!r}")
    if saved_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"fit_memory: expected saved_dtype to be None, torch.bfloat16 or torch.float16, got "
                         f"{saved_dtype!r}")
    for name, function in (("transform", transform), ("accept", accept)):
        if function is not None and not callable(function):
            raise TypeError(f"fit_memory: expected {name} to be callable, got {type(function).__name__}")
    # llkern.nn imports llkern.local lazily the other way
    from llkern.nn.recompute import _cut, _most_segments

    # its own storage: the meter counts whole storages, and a slice x[:8] of a larger batch would count all of it;
    # outside inference mode, where autograd would save nothing (an inference tensor cannot be saved at all)
    with torch.inference_mode(False):
        example_input = example_input.detach().clone()
        # the same samples' first half, to tell the bytes that grow with the batch from those that do not
        half_input = example_input[:batch // 2].clone() if batch_size != batch and batch >= 4 else None
    tried: list[tuple[int, int, int]] = []
    rejected: list[tuple[int, int]] = []
    fit: MemoryFit | None = None
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # split's warnings once, not once per K
            warnings.simplefilter("always")
            for k in range(min_k, max_k + 1):
                try:
                    plan = split(model, k, by="saved_bytes", example_input=example_input)
                except TooManyModulesError as error:
                    if k == min_k:
                        raise ValueError(f"fit_memory: min_k={min_k} is more modules than the model allows "
                                         f"({error.possible})") from error
                    break  # the model has no more places to cut
                units = [u for m in plan.modules for u in m]
                if transform is None:
                    candidates = list(plan.modules)
                    costs, writes = _module_costs(plan, example_input)
                else:
                    with torch.inference_mode(False):
                        candidates = _transformed(plan.modules, transform)
                        units += candidates  # (their modes; their buffers are the model's)
                        costs, writes = (_own_costs(candidates, example_input) if max(segments) > 1
                                         else ([None] * k, [None] * k))
                allowed = [1 if c is None else _most_segments(m, w)
                           for m, c, w in zip(candidates, costs, writes, strict=True)]
                measured: set[tuple[int, ...]] = set()
                for s in segments:
                    # a module allowing fewer cuts has fewer segments: a count that cuts no module further is skipped
                    counts = tuple(min(s, c) for c in allowed)
                    if counts in measured:
                        continue
                    measured.add(counts)
                    modules = candidates if s == 1 else [
                        _cut(m, count, c, w, True)
                        for m, count, c, w in zip(candidates, counts, costs, writes, strict=True)]
                    with torch.inference_mode(False), _TrainModeNoSideEffects(units, example_input.device), \
                            _autocast(example_input.device, autocast), _saved_in(saved_dtype):
                        traces = _module_traces(modules, example_input)
                        halves = (_module_traces(modules, half_input) if half_input is not None
                                  else [None] * len(traces))
                    peaks = [_predicted_peak(t, h, batch, batch_size) for t, h in zip(traces, halves, strict=True)]
                    tried.append((k, s, max(peaks)))
                    if max(peaks) <= budget_bytes:
                        with torch.inference_mode(False):
                            accepted = accept is None or bool(accept(modules))
                        if accepted:
                            fit = MemoryFit(k, s, modules, plan, max(peaks), peaks, batch_size, budget_bytes, tried,
                                            rejected)
                            break
                        rejected.append((k, s))
                if fit is not None:
                    break
    finally:  # also when an error ends the search: the warnings before it may explain it
        for message in {(str(w.message), w.category): None for w in caught}:
            warnings.warn(message[0], message[1], stacklevel=2)
    if fit is None:
        best = min(tried, key=lambda t: t[2]) if tried else None
        least = (f"; the least was {_format_bytes(best[2])} (K = {best[0]}, {best[1]} segment"
                 f"{'s' if best[1] > 1 else ''})" if best else "")
        most = max((t[0] for t in tried), default=0)
        modules = f"{most} modules" + (f" (the most this model allows; max_k={max_k})" if most < max_k else "")
        larger_k = "" if most < max_k else ", larger max_k"  # more modules than the model allows do not exist
        shown = ", ".join(f"K = {k} with {s}" for k, s in rejected[:4]) + (", ..." if len(rejected) > 4 else "")
        refused = f" ({len(rejected)} that did were not accepted: {shown})" if rejected else ""
        accepted = "accepted " if rejected else ""
        options = ([] if transform is not None else
                   ["transform=lambda m: convert(m, relu_masks=True, bn_relu_recompute=True) (convert from "
                    "llkern.activation_memory)"])
        if autocast is None and not torch.is_autocast_enabled(example_input.device.type):
            options.append("autocast=torch.bfloat16")
        if saved_dtype is None and not _inside_saved_tensors_in():
            options.append("saved_dtype=torch.bfloat16 (approximate gradients)")
        lighter = f", or fit with fewer saved bytes: {' or '.join(options)}" if options else ""
        raise ValueError(f"fit_memory: no {accepted}split of up to {modules} with segments {segments} keeps a module's "
                         f"saved activations within {_format_bytes(budget_bytes)} for a batch of {batch_size}"
                         f"{refused}{least}. Try a smaller batch{larger_k} or more segments{lighter}")
    return fit
