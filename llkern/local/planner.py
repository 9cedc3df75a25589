"""Split planner: cut a network into K local modules balanced by layers, parameters or saved bytes.

``split(model, k, by="saved_bytes", example_input=x)`` flattens ``model`` into *units* (the finest
pieces that are still whole blocks), chooses K contiguous groups of units that minimise the largest
group's cost, and returns a :class:`SplitPlan` whose ``modules`` (one ``nn.Sequential`` per group,
sharing the model's parameters) go straight into :class:`llkern.LocalNet`.

Supported models (their forward order must be readable from their structure):

- an ``nn.Sequential``: its entries in order. Entries that are plain ``nn.Sequential`` (no forward of
  their own) or ``nn.ModuleList`` are flattened in place, recursively, so a ResNet/VGG written as
  stages of blocks becomes its blocks. A block is a module with ``forward_residual`` (llkern's residual
  protocol) or any other module; it is never split.
- an ``nn.ModuleList``, or a Python list/tuple of modules: a chain, flattened the same way.
- any model with a ``split_units()`` method returning its units in forward order (modules, ``nn.ModuleList``
  or ``nn.Sequential`` containers, flattened the same way), such that chaining them computes ``model(x)``.
  This is the protocol for transformer stacks: ``return [self.embed, self.blocks, self.head]``.

Cost of a group of units, by ``by``:

- ``"layers"``: the number of units;
- ``"params"``: the number of distinct parameters' elements (a tied parameter counts once per group);
- ``"saved_bytes"``: the bytes of distinct storages that autograd saves for backward when the group runs
  as a local module (input detached), measured with :class:`llkern.local.memory.MemoryMeter` on ``example_input``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llkern.local.memory import MemoryMeter, _storage_key

MEASURES = ("layers", "params", "saved_bytes")

_SUPPORTED = ("an nn.Sequential (nested plain nn.Sequential and nn.ModuleList entries are flattened in place), "
              "an nn.ModuleList or a list of modules (a chain), or a model with a split_units() method "
              "returning its units in forward order")


@dataclass
class SplitPlan:
    """The result of :func:`split`.

    Attributes:
        modules: the K modules, each an ``nn.Sequential`` of the original units (shared, not copied).
        by: the measure that was balanced (``"layers"``, ``"params"`` or ``"saved_bytes"``).
        costs: each module's cost in that measure (for ``"saved_bytes"``: the planner's figure).
        boundaries: unit indices ``[0, b_1, ..., n]``; module k holds units ``boundaries[k]:boundaries[k+1]``.
        unit_names: each unit's qualified name in the model (or its type name when it has none).
        unit_costs: each unit's own cost in the chosen measure.
        params: each module's parameter count.
        saved_bytes: each module's saved-for-backward bytes, measured by running it as a local module on the
            example input (None without an example input).
        total_saved_bytes: the whole model's saved-for-backward bytes end to end on the example input
            (None without one).
    """

    modules: list[nn.Sequential]
    by: str
    costs: list[int]
    boundaries: list[int]
    unit_names: list[str]
    unit_costs: list[int]
    params: list[int]
    saved_bytes: list[int] | None = None
    total_saved_bytes: int | None = None

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[nn.Sequential]:
        return iter(self.modules)

    def __getitem__(self, k: int) -> nn.Sequential:
        return self.modules[k]

    def __str__(self) -> str:
        fmt = _format_bytes if self.by == "saved_bytes" else _format_count
        header = ["module", "units", "first … last unit", "params", f"cost ({self.by})"]
        if self.saved_bytes is not None:
            header.append("saved (measured)")
        rows = []
        for k, cost in enumerate(self.costs):
            start, stop = self.boundaries[k], self.boundaries[k + 1]
            first, last = (f"{self.unit_names[i]} ({type(self.modules[k][i - start]).__name__})"
                           for i in (start, stop - 1))
            row = [str(k), f"{start}–{stop - 1} ({stop - start})" if stop - start > 1 else f"{start} (1)",
                   first if stop - start == 1 else f"{first} … {last}",
                   _format_count(self.params[k]), fmt(cost)]
            if self.saved_bytes is not None:
                row.append(_format_bytes(self.saved_bytes[k]))
            rows.append(row)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        # The unit range and names read left to right; the numbers line up on the right.
        table = [[c.ljust(w) if i in (1, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
                  for r in [header, ["-" * w for w in widths], *rows]]
        mean = sum(self.costs) / len(self.costs)
        lines = [f"SplitPlan: {len(self.modules)} modules from {len(self.unit_names)} units, balanced by {self.by}; "
                 f"largest {fmt(max(self.costs))} = {max(self.costs) / mean if mean else 1.0:.2f}× the mean",
                 *("  ".join(cells).rstrip() for cells in table)]
        if self.saved_bytes is not None and self.total_saved_bytes:
            lines.append(f"end to end: {_format_bytes(self.total_saved_bytes)} saved; largest module "
                         f"{_format_bytes(max(self.saved_bytes))} "
                         f"({100 * max(self.saved_bytes) / self.total_saved_bytes:.1f}%)")
        return "\n".join(lines)


def _format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _format_count(n: float) -> str:
    return f"{int(n):,}"


def _is_plain_sequential(module: nn.Module) -> bool:
    # A subclass with its own forward may not run its entries in order: it is a block, not a container.
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _flatten(module: nn.Module, name: str, out: list[tuple[str, nn.Module]]) -> None:
    """Append the units of ``module`` (named from ``name``) to ``out`` in forward order."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"split: expected nn.Module units, got {type(module).__name__} at {name or 'the top level'}")
    if not hasattr(module, "forward_residual") and (_is_plain_sequential(module) or isinstance(module, nn.ModuleList)):
        # _modules rather than named_children(): the latter skips a module that appears twice,
        # but the container runs it twice.
        for child_name, child in module._modules.items():
            if child is not None:
                _flatten(child, f"{name}.{child_name}" if name else child_name, out)
        return
    if isinstance(module, nn.ModuleDict):
        raise TypeError(f"split: cannot infer the forward order of the nn.ModuleDict at {name or 'the top level'}; "
                        f"supported: {_SUPPORTED}")
    out.append((name or type(module).__name__, module))


def _units(model: nn.Module | Sequence[nn.Module]) -> list[tuple[str, nn.Module]]:
    """The model's units in forward order, with their qualified names."""
    out: list[tuple[str, nn.Module]] = []
    if isinstance(model, (list, tuple)):
        for i, module in enumerate(model):
            _flatten(module, str(i), out)
    elif callable(getattr(model, "split_units", None)):
        names = {id(m): n for n, m in model.named_modules() if n}
        for module in model.split_units():
            _flatten(module, names.get(id(module), type(module).__name__), out)
    elif _is_plain_sequential(model) or isinstance(model, nn.ModuleList):
        _flatten(model, "", out)
    else:
        kind = "an nn.Module with its own forward" if isinstance(model, nn.Module) else "not an nn.Module"
        raise TypeError(f"split: cannot infer the forward order of {type(model).__name__} ({kind}); "
                        f"supported: {_SUPPORTED}")
    return out


def linear_partition(group_cost: Callable[[int, int], float], n: int, k: int) -> list[int]:
    """Cut units ``0..n-1`` into ``k`` non-empty contiguous groups minimising the largest group cost.

    Exact dynamic programme, O(n²k) evaluations of a table of O(n²) group costs. Among the partitions
    with the optimal bottleneck it returns one with the least sum of squared group costs, so the groups
    other than the bottleneck are balanced too (remaining ties: the earliest cuts).

    Args:
        group_cost: ``group_cost(i, j)`` is the cost of the group of units ``i..j-1`` (need not be additive).
        n: the number of units.
        k: the number of groups, 1 ≤ k ≤ n.

    Returns:
        the boundaries ``[0, b_1, ..., b_{k-1}, n]``.
    """
    if not 1 <= k <= n:
        raise ValueError(f"linear_partition: expected 1 <= k <= n, got k={k}, n={n}")
    cost = [[group_cost(i, j) if j > i else 0 for j in range(n + 1)] for i in range(n + 1)]
    inf = float("inf")
    # best[m][j]: the least bottleneck for units 0..j-1 in m groups.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for m in range(1, k + 1):
        for j in range(m, n - (k - m) + 1):
            best[m][j] = min(max(best[m - 1][i], cost[i][j]) for i in range(m - 1, j))
    bottleneck = best[k][n]
    # Second pass: least sum of squares under the bottleneck (every group's cost <= bottleneck is
    # exactly "achieves the optimum", and the comparison is exact since bottleneck is one of the costs).
    squares = [[inf] * (n + 1) for _ in range(k + 1)]
    choice = [[-1] * (n + 1) for _ in range(k + 1)]
    squares[0][0] = 0
    for m in range(1, k + 1):
        for j in range(m, n - (k - m) + 1):
            for i in range(m - 1, j):
                if cost[i][j] <= bottleneck and squares[m - 1][i] + cost[i][j] ** 2 < squares[m][j]:
                    squares[m][j], choice[m][j] = squares[m - 1][i] + cost[i][j] ** 2, i
    bounds = [n]
    for m in range(k, 0, -1):
        bounds.append(choice[m][bounds[-1]])
    return bounds[::-1]


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class _KeyRecorder(MemoryMeter):
    """A MemoryMeter that also records which storages (key → bytes) each unit saves."""

    def __init__(self, exclude: Sequence[torch.Tensor]) -> None:
        # device="cpu": never touch the CUDA allocator's peak statistics, which the user may be reading.
        super().__init__(exclude=exclude, device="cpu")
        self.per_unit: list[dict[tuple, int]] = []

    def _pack(self, tensor: torch.Tensor):
        handle = super()._pack(tensor)
        if handle is not tensor and self.per_unit:  # the meter counted this storage
            self.per_unit[-1][_storage_key(tensor)] = tensor.untyped_storage().nbytes()
        return handle


class _TrainModeNoSideEffects:
    """Run in training mode (training memory is what is planned) and undo what that changes.

    Restores every module's ``training`` flag, the buffers (BatchNorm running statistics) and the
    random number generators (dropout draws), so planning leaves the model and the RNG as they were.
    """

    def __init__(self, modules: Sequence[nn.Module], device: torch.device) -> None:
        self.modules = [m for top in modules for m in top.modules()]
        self.device = device

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.modules]
        self.buffers = {id(b): (b, b.detach().clone()) for m in self.modules for b in m.buffers(recurse=False)
                        if not isinstance(b, nn.parameter.UninitializedBuffer)}
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        self.rng = torch.random.fork_rng(devices=devices)
        self.rng.__enter__()
        for m in self.modules:
            m.train()

    def __exit__(self, *exc) -> None:
        self.rng.__exit__(*exc)
        for m, flag in zip(self.modules, self.flags, strict=True):
            m.training = flag
        with torch.no_grad():
            for buffer, copy in self.buffers.values():
                if buffer.shape == copy.shape:
                    buffer.copy_(copy)


def _detached(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def _saved_keys_per_unit(units: list[nn.Module], params: list[torch.Tensor],
                         example_input: torch.Tensor) -> tuple[list[dict[tuple, int]], int]:
    """Run the chain once with gradients; return the storages each unit saves and the end-to-end peak."""
    recorder = _KeyRecorder(exclude=params)
    h = _detached(example_input)
    outputs = []  # kept so that no saved storage is freed and its address reused during the run
    with torch.enable_grad(), recorder:
        for unit in units:
            recorder.per_unit.append({})
            h = unit(h)
            outputs.append(h)
    keys, peak = recorder.per_unit, recorder.peak_saved_bytes
    del outputs, h  # drops the graph; the recorder releases its handles
    return keys, peak


def _measure_modules(modules: list[nn.Sequential], params: list[torch.Tensor],
                     example_input: torch.Tensor) -> list[int]:
    """Saved bytes of each module run as LocalNet runs it: on the previous module's detached output."""
    saved, h = [], _detached(example_input)
    with torch.enable_grad():
        for module in modules:
            with MemoryMeter(exclude=params, device="cpu") as meter:
                out = module(h)
            saved.append(meter.peak_saved_bytes)
            h = _detached(out)
            del out
    return saved


def _numel(p: torch.Tensor) -> int:
    if isinstance(p, nn.parameter.UninitializedParameter):
        raise ValueError("split: the model has uninitialised (lazy) parameters; run it once, or pass "
                         "example_input, before splitting by params")
    return p.numel()


def split(model: nn.Module | Sequence[nn.Module], k: int, *, by: str = "saved_bytes",
          example_input: torch.Tensor | None = None) -> SplitPlan:
    """Cut ``model`` into ``k`` contiguous modules balanced by ``by``.

    Args:
        model: an ``nn.Sequential`` (nested plain ``nn.Sequential`` / ``nn.ModuleList`` entries are flattened in
            place, so stages of residual blocks become blocks), an ``nn.ModuleList`` or list of modules, or a
            model with a ``split_units()`` method returning its units in forward order (transformer stacks:
            ``[embed, blocks, head]``). Blocks (modules with ``forward_residual``, or any non-container
            module) are never cut.
        k: the number of modules, 1 ≤ k ≤ the number of units.
        by: ``"layers"`` (equal unit counts), ``"params"`` (balanced parameter counts) or ``"saved_bytes"``
            (balanced bytes saved for backward, measured on ``example_input``; the default).
        example_input: a batch for the model; required by ``by="saved_bytes"``. When given, the plan also
            reports every module's measured saved bytes, whatever ``by`` is. The model runs in training
            mode under gradients for the measurement; its modes, buffers (BatchNorm statistics) and the
            RNG state are restored afterwards, and no gradient is computed.

    Returns:
        a :class:`SplitPlan`; ``plan.modules`` share the model's parameters and, chained, compute ``model(x)``.
    """
    if by not in MEASURES:
        raise ValueError(f"split: by must be one of {', '.join(map(repr, MEASURES))}, got {by!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"split: expected k >= 1 modules, got {k!r}")
    if by == "saved_bytes" and example_input is None:
        raise ValueError("split: by='saved_bytes' measures the bytes each unit saves for backward on an example "
                         "batch: pass example_input=<a small batch>, or use by='layers' or by='params'")
    named = _units(model)
    n = len(named)
    if n == 0:
        raise ValueError(f"split: {type(model).__name__} has no units to split")
    if k > n:
        raise ValueError(f"split: cannot cut {n} units into k={k} modules (k must be at most the number of units, "
                         f"{n}); units are whole blocks and layers, never split")
    names = [name for name, _ in named]
    units = [unit for _, unit in named]
    params = list({id(p): p for unit in units for p in unit.parameters()}.values())

    keys: list[dict[tuple, int]] | None = None
    total = None
    if example_input is not None:
        with _TrainModeNoSideEffects(units, example_input.device):
            keys, total = _saved_keys_per_unit(units, params, example_input)
        params = list({id(p): p for unit in units for p in unit.parameters()}.values())  # lazy ones now exist

    # Each unit's cost as a dict key -> amount; a group costs the sum over the union of its units' keys,
    # so a storage saved by two units (a ReLU's output, saved again by the next conv) or a tied
    # parameter counts once per group, as the meter counts it.
    if by == "layers":
        unit_sets = [{i: 1} for i in range(n)]
    elif by == "params":
        unit_sets = [{id(p): _numel(p) for p in unit.parameters()} for unit in units]
    else:
        assert keys is not None
        unit_sets = keys
    trainable = [_trainable(unit) for unit in units]

    def first_recorded(i: int) -> int:
        # A local module's input is detached: the units before its first trainable one record no graph
        # and save nothing (a ReLU or max-pool at a module's start), unlike in the end-to-end run.
        if by != "saved_bytes":
            return i
        while i < n and not trainable[i]:
            i += 1
        return i

    table = [[0] * (n + 1) for _ in range(n + 1)]
    for i in range(n):
        union: dict = {}
        for j in range(first_recorded(i), n):
            union.update(unit_sets[j])
            table[i][j + 1] = sum(union.values())
    bounds = linear_partition(lambda i, j: table[i][j], n, k)

    modules = [nn.Sequential(*units[bounds[m]:bounds[m + 1]]) for m in range(k)]
    costs = [table[bounds[m]][bounds[m + 1]] for m in range(k)]
    module_params = [sum(_numel(p) for p in {id(p): p for p in module.parameters()}.values()) for module in modules]
    saved = None
    if example_input is not None:
        with _TrainModeNoSideEffects(units, example_input.device):
            saved = _measure_modules(modules, params, example_input)
    return SplitPlan(modules=modules, by=by, costs=costs, boundaries=bounds, unit_names=names,
                     unit_costs=[sum(s.values()) for s in unit_sets], params=module_params,
                     saved_bytes=saved, total_saved_bytes=total)
