"""Recomputed segments inside a module: keep each segment's input, run the segment again in the backward.

Local training bounds activation memory by the largest module. Inside a module, :func:`recompute_segments`
cuts an ``nn.Sequential`` into S contiguous segments; every segment but the last runs its forward without
saving anything except its input, and its backward runs the segment once more with gradients, then
back-propagates through that recomputed graph and frees it. The module's saved-for-backward peak falls from
the sum over all its layers to about the segment inputs plus the largest segment, at the cost of one more
forward of the first S − 1 segments (the same trade as ``torch.utils.checkpoint``).

Exact, not approximate: the recomputation sees the same input, the same random numbers (the CPU generator and
the input's device generator are restored, so dropout draws the same mask), the same autocast state, and the
buffers as the forward found them (a buffer the forward moved, as spectral_norm's power iteration, is set back to
its value before the forward for the recomputation; BatchNorm's running statistics and counters are put back after
the recomputation, so they move once per step, not twice). Gradients are bitwise those of the plain module, except
that a parameter used three or more times, in a recomputed segment and elsewhere, may sum its contributions in
another order (a difference in the last bit). Under ``torch.compile`` the recomputed segments run eagerly (their
recomputation in the backward is eager: a compiled forward would draw other dropout masks); under ``torch.func``'s
transforms (``vmap``, ``grad``), and for a lazy module's first forward, segments run plainly, recomputing nothing.

Why not ``torch.utils.checkpoint``: its recomputation saves through checkpoint's own saved-tensor hooks, which
replace any enclosing ones, so :class:`llkern.MemoryMeter` (and :func:`llkern.activation_memory.saved_tensors_in`)
never see what it holds, and BatchNorm statistics move twice per step. Here the segment's input is saved with
``save_for_backward`` and the recomputation runs under whatever hooks are active when the backward runs, so the
meter counts both, and ``saved_tensors_in`` stores them in 16 bits. The segment's parameters are inputs of the
autograd node, so ``DistributedDataParallel`` (``find_unused_parameters`` included) sees them in the graph and
their gradients accumulate once, through autograd's own accumulation.

Forward hooks of the modules inside a recomputed segment run twice per step (forward and recomputation), as with
``torch.utils.checkpoint``: in the forward without gradients, so a hook that keeps outputs for a loss (MODA's) cannot
be used on a module inside a recomputed segment. Double backward through a recomputed segment is not supported (a
clear error).
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["RecomputedSequential", "recompute_modules", "recompute_segments"]


class _Segment:
    """Children ``lo..hi-1`` of a RecomputedSequential, called as one function returning a tuple of tensors:
    the output, then (when ``residuals`` is set) the residual branches of the blocks inside, for TRGL."""

    def __init__(self, modules: list[nn.Module], residuals: bool) -> None:
        self.modules, self.residuals = modules, residuals

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.residuals:
            for module in self.modules:
                x = module(x)
            return (x,)
        from llkern.local.net import run_module  # the residual protocol's one reader (llkern.local imports llkern.nn)

        collected: list[torch.Tensor] = []
        for module in self.modules:
            x = run_module(module, x, collected)
        return (x, *collected)

    def buffers(self) -> list[torch.Tensor]:
        return list({id(b): b for m in self.modules for b in m.buffers()}.values())

    def tensors(self) -> list[tuple[dict, str, torch.Tensor]]:
        """Every parameter and buffer entry of the modules inside, as ``(dict, name, tensor)``."""
        return [(d, name, t) for top in self.modules for m in top.modules()
                for d in (m._parameters, m._buffers) for name, t in d.items() if t is not None]

    @contextlib.contextmanager
    def holding(self, recorded: list[tuple[dict, str, torch.Tensor]]) -> Iterator[None]:
        """The modules holding the tensors the forward used. Under ``torch.func.functional_call`` the forward ran
        with tensors swapped in that are gone by the backward: without them the recomputation would use the
        module's own and give the swapped-in ones no gradient."""
        missing = object()
        changed = [(d, name, t) for d, name, t in recorded if d.get(name, missing) is not t]
        previous = [(d, name, d.get(name, missing)) for d, name, _ in changed]
        for d, name, t in changed:
            d[name] = t
        try:
            yield
        finally:
            for d, name, old in previous:
                if old is missing:
                    d.pop(name, None)
                else:
                    d[name] = old


class _DeviceState:
    """What the recomputation must see as the forward saw it: random generators and autocast."""

    def __init__(self, device: torch.device, preserve_rng_state: bool) -> None:
        self.device = device
        self.cpu_rng = torch.get_rng_state() if preserve_rng_state else None
        self.device_rng = None
        if preserve_rng_state and device.type != "cpu":
            module = getattr(torch, device.type, None)
            if module is not None and hasattr(module, "get_rng_state"):
                self.device_rng = module.get_rng_state(device)
        # (the meta device, which llkern.split measures on, has no autocast)
        types = [t for t in dict.fromkeys([device.type, "cpu"]) if torch.amp.is_autocast_available(t)]
        self.autocast = [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types]
        self.autocast_cache = torch.is_autocast_cache_enabled()

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.cpu_rng is not None:
                if self.device_rng is not None:
                    stack.enter_context(torch.random.fork_rng(devices=[self.device], device_type=self.device.type))
                else:
                    stack.enter_context(torch.random.fork_rng(devices=[]))
                torch.set_rng_state(self.cpu_rng)
                if self.device_rng is not None:
                    getattr(torch, self.device.type).set_rng_state(self.device_rng, self.device)
            for device_type, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                                   cache_enabled=self.autocast_cache))
            yield


class _RecomputeFunction(torch.autograd.Function):
    """One recomputed segment: ``outputs = segment(x)``, saving only ``x``.

    ``params`` are the segment's parameters that require gradients: inputs of this node, so that their
    gradients flow out of its backward into autograd's accumulation (hooks, DDP) instead of being accumulated
    by a nested backward."""

    @staticmethod
    def forward(ctx: Any, segment: _Segment, preserve_rng_state: bool, x: torch.Tensor,
                *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.segment, ctx.params = segment, params
        ctx.tensors = segment.tensors()
        ctx.state = _DeviceState(x.device, preserve_rng_state)
        ctx.save_for_backward(x)
        ctx.set_materialize_grads(False)  # an output nobody used (a residual without penalty) gets None
        version = x._version
        # the buffers before the forward, kept for those it moves: a module whose output reads a buffer it updates
        # (spectral_norm's power iteration) must start its recomputation from the same values
        buffers = [b for b in segment.buffers() if not b.is_inference()]
        versions = [b._version for b in buffers]
        before = [b.clone() for b in buffers]
        outputs = segment(x)  # autograd.Function.forward runs without gradients: nothing inside is saved
        ctx.moved = [(b, copy) for b, copy, v in zip(buffers, before, versions, strict=True) if b._version != v]
        del before
        if x._version != version:
            raise RuntimeError(
                f"RecomputedSequential: the segment starting with {type(segment.modules[0]).__name__} wrote into its "
                "input in place, so its recomputation would start from the changed input. Cut the segments elsewhere "
                "(recompute_segments never starts one at a module with inplace=True) or make the operation out of "
                "place")
        if any(not isinstance(o, torch.Tensor) for o in outputs):
            raise TypeError("recompute_segments: every unit of a recomputed segment must return a tensor, got "
                            + ", ".join(type(o).__name__ for o in outputs))
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        nothing = (None,) * (3 + len(ctx.params))
        if all(g is None for g in grads):
            return nothing
        x_again = x.detach().requires_grad_(needs[2])
        with ctx.segment.holding(ctx.tensors):
            return _RecomputeFunction._recompute(ctx, x_again, grads, nothing)

    @staticmethod
    def _recompute(ctx: Any, x_again: torch.Tensor, grads: tuple, nothing: tuple) -> tuple[torch.Tensor | None, ...]:
        needs = ctx.needs_input_grad
        buffers = ctx.segment.buffers()
        kept = [b.clone() for b in buffers]  # BatchNorm statistics: moved by the forward, not again here
        try:
            with torch.no_grad():  # the recomputation starts from the buffers the forward started from
                for buffer, copy in ctx.moved:
                    buffer.copy_(copy)
            with torch.enable_grad(), ctx.state.restored():
                outputs = ctx.segment(x_again)
            pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None and o.requires_grad]
            wrt = ([x_again] if needs[2] else []) + [p for p, need in zip(ctx.params, needs[3:], strict=True) if need]
            if not pairs or not wrt:
                return nothing
            computed = list(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                                allow_unused=True))
        finally:
            # after the gradients: BatchNorm's backward holds the running statistics it was given
            with torch.no_grad():
                for buffer, copy in zip(buffers, kept, strict=True):
                    buffer.copy_(copy)
        grad_x = computed.pop(0) if needs[2] else None
        grad_params = iter(computed)
        return (None, None, grad_x, *(next(grad_params) if need else None for need in needs[3:]))


@torch.compiler.disable
def _apply_eagerly(segment: _Segment, preserve_rng_state: bool, x: torch.Tensor,
                   *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A recomputed segment, run eagerly under ``torch.compile`` too: its recomputation in the backward is eager,
    and a compiled forward would draw other random numbers (dropout masks) and round otherwise."""
    return _RecomputeFunction.apply(segment, preserve_rng_state, x, *params)


class RecomputedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose segments, all but the last, are recomputed in the backward.

    Holds the same child modules under the same names as the Sequential it was made from (``state_dict`` keys and
    parameter objects unchanged); ``boundaries`` ``[0, b_1, ..., len(self)]`` are the segments' first children.
    Build it with :func:`recompute_segments`. Without gradients (evaluation, ``torch.no_grad``) it runs as a
    plain Sequential.
    """

    def __init__(self, module: nn.Sequential, boundaries: Sequence[int], *, preserve_rng_state: bool = True) -> None:
        super().__init__(OrderedDict(module._modules.items()))
        boundaries = [int(b) for b in boundaries]
        if (len(boundaries) < 2 or boundaries[0] != 0 or boundaries[-1] != len(self)
                or any(a >= b for a, b in itertools.pairwise(boundaries))):
            raise ValueError(f"RecomputedSequential: expected boundaries to rise strictly from 0 to the {len(self)} "
                             f"children, got {boundaries}")
        self.boundaries = boundaries
        self.preserve_rng_state = bool(preserve_rng_state)

    @property
    def segments(self) -> int:
        return len(self.boundaries) - 1

    def __getitem__(self, idx: slice | int) -> nn.Module:
        if isinstance(idx, slice):  # nn.Sequential would build this class without boundaries: a plain one
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def extra_repr(self) -> str:
        return f"boundaries={self.boundaries}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._run(input, residuals=False)[0]

    def forward_residuals(self, input: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(output, residual branches of the blocks inside, in order)``: the residual protocol of a whole
        sequence, read by :func:`llkern.run_module` (TRGL's per-block penalty)."""
        output, *residuals = self._run(input, residuals=True)
        return output, residuals

    def _run(self, x: torch.Tensor, residuals: bool) -> list[torch.Tensor]:
        children = list(self._modules.values())
        if len(children) != self.boundaries[-1]:
            raise RuntimeError(f"RecomputedSequential: it has {len(children)} children but its boundaries "
                               f"{self.boundaries} cover {self.boundaries[-1]}: children were added or removed "
                               "after it was built; build it again with recompute_segments")
        # under torch.func's transforms (vmap, grad) the autograd.Function cannot run: the segments run plainly
        record = (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
                  and not torch._C._are_functorch_transforms_active())
        collected: list[torch.Tensor] = []
        last = len(self.boundaries) - 2
        for i, (lo, hi) in enumerate(itertools.pairwise(self.boundaries)):
            segment = _Segment(children[lo:hi], residuals)
            # the last segment's backward comes first: recomputing it would repeat its forward for nothing
            if i < last and record:
                params = list({id(p): p for m in segment.modules for p in m.parameters() if p.requires_grad}.values())
                differentiable = isinstance(x, torch.Tensor) and (x.requires_grad or bool(params))
                # a lazy module's parameters get their shapes in its first forward: that one runs plainly
                lazy = any(nn.parameter.is_lazy(t) for m in segment.modules
                           for t in itertools.chain(m.parameters(), m.buffers()))
                if differentiable and not lazy:
                    x, *found = _apply_eagerly(segment, self.preserve_rng_state, x, *params)
                    collected.extend(found)
                    continue
            x, *found = segment(x)
            collected.extend(found)
        return [x, *collected]


def _check_sequential(module: Any) -> None:
    if type(module) is not nn.Sequential and not isinstance(module, RecomputedSequential):
        name = type(module).__name__
        hint = ("" if not isinstance(module, nn.Module) else
                f": a {name} with its own forward may not call its children in order; list them in an nn.Sequential "
                "(llkern.split's modules are), or llkern.trace_units(model) for a model with its own forward")
        raise TypeError(f"recompute_segments: expected module to be an nn.Sequential, got {name}{hint}")


def _first_layer(child: nn.Module) -> nn.Module | None:
    """The layer ``child`` runs first (through nested Sequentials) when it writes into its input
    (``inplace=True``), else None."""
    while isinstance(child, nn.Sequential) and len(child):
        child = next(iter(child._modules.values()))
    return child if getattr(child, "inplace", False) is True else None


def _writes_input(children: list[nn.Module], writes: Sequence[bool] | None) -> list[bool]:
    """Whether each child writes into its input: ``inplace=True`` on its first layer, or seen doing so when
    measured (``writes``: :attr:`llkern.SplitPlan.unit_writes_input`, a forward starting with ``x.relu_()``)."""
    return [_first_layer(child) is not None or bool(writes is not None and writes[i])
            for i, child in enumerate(children)]


def _admissible(writes: list[bool]) -> list[int]:
    """Where a segment may start (and the end): never at a child that writes into its input (ReLU(inplace=True)),
    which would change the segment's saved input."""
    n = len(writes)
    return [0] + [i for i in range(1, n) if not writes[i]] + [n]


def _most_segments(module: nn.Sequential, writes: Sequence[bool] | None = None) -> int:
    """The most segments ``module`` allows: 1 when its first child writes into the module's input."""
    flags = _writes_input(list(module._modules.values()), writes)
    if not flags or flags[0]:
        return 1
    return len(_admissible(flags)) - 1


def recompute_modules(modules: Sequence[nn.Module], segments: int, *,
                      example_input: torch.Tensor | None = None) -> list[nn.Module]:
    """:func:`recompute_segments` on every module of a split: each cut into at most ``segments`` recomputed segments.

    Args:
        modules: the modules in forward order (``llkern.split(...).modules``), plain ``nn.Sequential``s.
        segments: S, at least 1; a module that allows fewer cuts (fewer children, or children that write into their
            input) gets as many segments as it allows.
        example_input: a batch for the first module. With it each module's cuts balance the bytes its segments save,
            measured on its own input: the batch run through the modules before it in eval mode without gradients
            (shapes as in training; no statistics move).

    Returns:
        a new list of :class:`RecomputedSequential` (sharing the modules' children and parameters).
    """
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
        raise ValueError(f"recompute_modules: expected segments to be an int >= 1, got {segments!r}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"recompute_modules: expected example_input to be a tensor (a batch for the first module), got "
                        f"{type(example_input).__name__}")
    out: list[nn.Module] = []
    h = example_input
    for k, module in enumerate(modules):
        try:
            _check_sequential(module)
            if not len(module):
                raise ValueError("the module has no children to cut into segments")
            plain = _plain(module)
            unit_costs, writes = _measure(plain, h)
            out.append(_cut(plain, min(segments, _most_segments(plain, writes)), unit_costs, writes, True))
        except (TypeError, ValueError) as error:
            raise type(error)(f"recompute_modules: module {k}: {error}") from None
        if h is not None and k + 1 < len(modules):
            h = _eval_forward(module, h)
    return out


def _eval_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in eval mode without gradients (a later module's input, shaped as in training; no statistics
    move); the modes are restored."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            return module(x)
    finally:
        for m, training in modes:
            m.training = training


def recompute_segments(module: nn.Sequential, segments: int, *, example_input: torch.Tensor | None = None,
                       preserve_rng_state: bool = True) -> RecomputedSequential:
    """Cut ``module`` into ``segments`` runs of its children; all but the last are recomputed in the backward.

    Args:
        module: a plain ``nn.Sequential`` (a module of :func:`llkern.split`'s plan, or one you build). Its
            children become the returned module's children (same objects, same names: an optimizer made before
            keeps working, ``state_dict`` keys are unchanged).
        segments: S, from 1 (nothing recomputed) to the number of children. The saved peak falls with S until
            the segment inputs, which stay saved, outweigh the largest segment; 2 to 4 suits a module of a dozen
            blocks.
        example_input: a batch for ``module``. With it the cuts balance the bytes each segment saves for
            backward, measured per child as :func:`llkern.split` measures them (the module runs once in
            training mode; its modes, buffers and the RNG are restored). Without it, equal counts of children.
            Either way no segment starts at a child with ``inplace=True``, nor (with ``example_input``) at one
            seen writing into its input.
        preserve_rng_state: restore the random generators before each recomputation (dropout draws the same
            mask; default). Off saves a copy of the generator state per segment and step, for segments that
            draw no random numbers.

    Returns:
        a :class:`RecomputedSequential` computing the same function with the same gradients.

    Example::

        plan = llkern.split(model, 4, example_input=x[:32])
        modules = [recompute_segments(m, 3) for m in plan.modules]
        net = llkern.LocalNet(modules, num_classes=10, example_input=x[:2])

    Apply :func:`llkern.activation_memory.convert` before, not after: it searches plain Sequentials only.
    """
    _check_sequential(module)
    n = len(module)
    if n == 0:
        raise ValueError("recompute_segments: the module has no children to cut into segments")
    if isinstance(segments, bool) or not isinstance(segments, int) or not 1 <= segments <= max(n, 1):
        raise ValueError(f"recompute_segments: expected segments to be an int from 1 to the module's {n} children, "
                         f"got {segments!r}")
    if not isinstance(preserve_rng_state, bool):
        raise TypeError(f"recompute_segments: expected preserve_rng_state to be a bool, got {preserve_rng_state!r}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"recompute_segments: expected example_input to be a tensor (a batch for the module), got "
                        f"{type(example_input).__name__}")
    plain = _plain(module)
    unit_costs, writes = _measure(plain, example_input)
    return _cut(plain, segments, unit_costs, writes, preserve_rng_state)


def _plain(module: nn.Sequential) -> nn.Sequential:
    return module if type(module) is nn.Sequential else nn.Sequential(OrderedDict(module._modules.items()))


def _measure(plain: nn.Sequential, example_input: torch.Tensor | None) -> tuple[list[int] | None, list[bool] | None]:
    """Each child's saved bytes and whether it writes into its input, measured on ``example_input`` as
    :func:`llkern.split` measures them; ``(None, None)`` without one."""
    if example_input is None:
        return None, None
    from llkern.local.planner import split  # llkern.local imports llkern.nn

    with warnings.catch_warnings():  # the module may end on a Linear: split's classifier warning is for modules
        warnings.simplefilter("ignore")
        plan = split(plain, 1, by="saved_bytes", example_input=example_input, flatten=False, allow_affine_end=True)
    return plan.unit_costs, plan.unit_writes_input


def _cut(plain: nn.Sequential, segments: int, unit_costs: Sequence[float] | None, writes: Sequence[bool] | None,
         preserve_rng_state: bool) -> RecomputedSequential:
    """``plain`` cut into ``segments`` balancing ``unit_costs`` (each child's saved bytes; None: equal counts),
    never starting a segment at a child that writes into its input."""
    from llkern.local.planner import linear_partition  # llkern.local imports llkern.nn

    children = list(plain)
    flags = _writes_input(children, writes)
    admissible = _admissible(flags)
    if segments > 1 and flags[0]:
        first = _first_layer(children[0])
        what = (f"{type(first).__name__}(inplace=True)" if first is not None
                else f"{type(children[0]).__name__}, whose forward writes into its input")
        raise ValueError(f"recompute_segments: the module starts with {what}, which would overwrite the first "
                         "segment's saved input; make it out of place")
    if segments > len(admissible) - 1:
        raise ValueError(f"recompute_segments: segments={segments} is more than the {len(admissible) - 1} this module "
                         f"allows (a segment never starts at a child that writes into its input)")
    costs = [1] * len(children) if unit_costs is None else list(unit_costs)
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    chosen = linear_partition(lambda i, j: prefix[admissible[j]] - prefix[admissible[i]], len(admissible) - 1,
                              segments)
    return RecomputedSequential(plain, [admissible[b] for b in chosen], preserve_rng_state=preserve_rng_state)
