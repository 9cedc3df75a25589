"""Split planner: cut a network into K local modules balanced by layers, parameters or saved bytes.

``split(model, k, by="saved_bytes", example_input=x)`` reads ``model`` as a chain of *units* (whole blocks,
never cut), chooses K contiguous groups of units that minimise the largest group's cost, cutting only where a
module would end on a nonlinearity, and returns a :class:`SplitPlan` whose ``modules`` (one ``nn.Sequential``
per group, sharing the model's parameters) go straight into :class:`llkern.LocalNet`.

Supported models (their forward order must be readable from their structure):

- an ``nn.Sequential``: its entries in order;
- an ``nn.ModuleList``, or a Python list/tuple of modules: a chain;
- any model with a ``split_units()`` method returning its entries in forward order (modules, ``nn.ModuleList``
  or ``nn.Sequential`` containers) such that chaining them computes ``model(x)``. This is the protocol for
  transformer stacks: ``return [self.embed, self.blocks, self.head]``;
- any other ``nn.Module`` with one input (others at their defaults) that ``torch.fx`` can trace
  (:func:`trace_units`): its forward is read as a graph and cut where exactly one tensor flows on, so a residual
  block, whose skip connection is live across it, is never cut; the pieces are the model's own layers or small
  ``GraphModule`` s that share its parameters (a ResNet or VGG written with its own forward, ``torch.flatten``
  and ``F.relu`` included). A forward that reads ``self.training`` or turns gradients off for a part is refused
  (fx would fix or drop it).

Units. Every entry of the chain is read with the same rules, recursively:

- a *layer* is a module without submodules (``Conv2d``, ``BatchNorm2d``, ``ReLU``, ``Linear``, ``MaxPool2d``…);
- a *block* is any other module that is not a plain container: a module with ``forward_residual`` (llkern's
  residual protocol), an ``nn.Sequential`` subclass with its own ``forward``, any custom module. It is one unit;
- a plain ``nn.Sequential`` (no ``forward`` of its own) is, with ``flatten="auto"`` (the default), a *layer
  group* when all its entries are layers: one unit, kept whole (``Sequential(Conv, BN, ReLU)``, a stem, a
  head); otherwise (it holds blocks or other Sequentials: a stage of residual blocks, a stage of
  conv-BN-ReLU groups and a pool) it is a *container* and its entries are read in its place.
  ``flatten=True`` reads every nested plain ``nn.Sequential`` as a container (down to its layers);
  ``flatten=False`` keeps every nested one whole;
- an ``nn.ModuleList`` has no forward of its own: it is always read as a container;
- an ``nn.ModuleDict`` is an error (no order).

So ``resnet32()`` (stem, 15 residual blocks, head) and a ResNet written as stages of blocks both give one unit
per block, and ``Sequential(Sequential(Conv, BN, ReLU), ...)`` is never cut inside its groups.

Cuts. A module must not end on an affine map (``Linear``, ``Conv*``, ``ConvTranspose*``, a normalisation layer,
``Embedding``) without a nonlinearity after it: its features would be a linear function of its input, and
its local loss could not train it past a linear classifier. A cut between two units is admissible when,
reading back from the cut past layers that keep linearity (``Identity``, ``Flatten``, ``Unflatten``, dropout,
average pooling, padding, ``PixelShuffle``, ``Upsample``), the first layer met is neither affine nor absent
(a first module of only reshapes computes nothing). Activations, max-pooling, any other layer and every
block (a residual block ends on its sum) end a module. ``allow_affine_end=True`` admits every cut between
units. The model's own end is always the last module's end, whatever its last layer: the last module's head
follows it there. A model that ends on an ``nn.Linear`` (its classifier) gets a warning, since LocalNet would
put its last head after that classifier.

Cost of a group of units, by ``by``:

- ``"layers"``: the number of units;
- ``"params"``: the number of distinct parameters' elements (a tied parameter counts once per group);
- ``"saved_bytes"``: the bytes of distinct storages that autograd saves for backward when the group runs
  as a local module (input detached), measured with :class:`llkern.local.memory.MemoryMeter` on ``example_input``;
- ``"time"``: the sum of the units' forward + backward seconds on ``example_input`` (the least of three runs), for
  a pipeline of stages (:class:`llkern.PipelineTrainer`), which runs at the speed of its slowest stage.

The exact partition (:func:`linear_partition`) runs over the admissible cuts only.
"""

from __future__ import annotations

import inspect
import operator
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from llkern.local.memory import MemoryMeter

MEASURES = ("layers", "params", "saved_bytes", "time")

_SUPPORTED = ("an nn.Sequential, an nn.ModuleList or a list of modules (a chain), a model with a split_units() "
              "method returning its units in forward order, or a model of one input that torch.fx can trace")


def _nn_classes(*names: str) -> tuple[type[nn.Module], ...]:
    # Only those this torch version has (RMSNorm, CircularPad*, Dropout1d are recent).
    return tuple(getattr(nn, name) for name in names if hasattr(nn, name))


#: Layers that compute an affine map of their input (normalisations: an affine map once their statistics are
#: fixed, and no more than a rescaling of the linear features before them).
AFFINE_LAYERS: tuple[type[nn.Module], ...] = _nn_classes(
    "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
    "InstanceNorm3d", "LayerNorm", "GroupNorm", "RMSNorm", "Embedding", "EmbeddingBag")

#: Parameter-free layers that keep an affine map affine: reading back from a cut skips them.
LINEAR_PASSTHROUGH: tuple[type[nn.Module], ...] = _nn_classes(
    "Identity", "Flatten", "Unflatten", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
    "FeatureAlphaDropout", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d", "ConstantPad3d",
    "ReflectionPad1d", "ReflectionPad2d", "ReflectionPad3d", "ReplicationPad1d", "ReplicationPad2d",
    "ReplicationPad3d", "CircularPad1d", "CircularPad2d", "CircularPad3d", "PixelShuffle", "PixelUnshuffle",
    "Upsample", "ChannelShuffle")


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
        example_batch: the example input's batch size, for which the bytes and times were measured (saved
            bytes grow with the batch; None without an example input).
        unit_writes_input: whether each unit's input was written in place in the measured run, by the unit or
            a later one (a forward starting with ``x.relu_()``, an ``nn.ReLU(inplace=True)``, or a pass-through
            unit before one); :func:`llkern.recompute_segments` starts no segment there. Writes through ``.data``
            are not seen. None without an example input.
        unit_input_writers: for each unit, the first unit (its own index or a later one) that wrote its input in
            place in the measured run, or None; ``unit_writes_input`` is whether there is one. A write by a unit of
            a later module does not matter within a module (LocalNet runs a module's backward before the next
            module's forward). None without an example input.
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
    example_batch: int | None = None
    unit_input_writers: list[int | None] | None = None

    @property
    def unit_writes_input(self) -> list[bool] | None:
        if self.unit_input_writers is None:
            return None
        return [writer is not None for writer in self.unit_input_writers]

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[nn.Sequential]:
        return iter(self.modules)

    def __getitem__(self, k: int) -> nn.Sequential:
        return self.modules[k]

    def __str__(self) -> str:
        fmt = {"saved_bytes": _format_bytes, "time": _format_seconds}.get(self.by, _format_count)
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
        measured = self.example_batch is not None and self.by in ("saved_bytes", "time")
        batch = f" (a batch of {self.example_batch})" if measured else ""
        lines = [f"SplitPlan: {len(self.modules)} modules from {len(self.unit_names)} units, balanced by {self.by}"
                 f"{batch}; largest {fmt(max(self.costs))} = {max(self.costs) / mean if mean else 1.0:.2f}× the mean",
                 *("  ".join(cells).rstrip() for cells in table)]
        if self.saved_bytes is not None and self.total_saved_bytes:
            lines.append(f"end to end: {_format_bytes(self.total_saved_bytes)} saved for a batch of "
                         f"{self.example_batch}; largest module "
                         f"{_format_bytes(max(self.saved_bytes))} "
                         f"({100 * max(self.saved_bytes) / self.total_saved_bytes:.1f}%)")
        return "\n".join(lines)


def _format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _format_seconds(n: float) -> str:
    return f"{1e3 * n:.2f} ms"


def _format_count(n: float) -> str:
    return f"{int(n):,}"


def _is_plain_sequential(module: nn.Module) -> bool:
    # A subclass with its own forward may not run its entries in order: it is a block, not a container.
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _is_container(module: nn.Module) -> bool:
    """A plain ``nn.Sequential`` or an ``nn.ModuleList``: it holds its entries in order and computes nothing else."""
    if hasattr(module, "forward_residual"):
        return False
    return _is_plain_sequential(module) or isinstance(module, nn.ModuleList)


def _entries(module: nn.Module) -> list[tuple[str, nn.Module]]:
    # _modules rather than named_children(): the latter skips a module that appears twice,
    # but the container runs it twice.
    return [(name, child) for name, child in module._modules.items() if child is not None]


def _is_layer(module: nn.Module) -> bool:
    """A single layer: a module without submodules that is not a container (Conv2d, BatchNorm2d, ReLU, Linear…)."""
    return not _is_container(module) and not isinstance(module, nn.ModuleDict) and next(module.children(), None) is None


def _read_as_container(module: nn.Module, flatten: bool | str) -> bool:
    """Whether the nested container ``module`` is read as its entries (True) or kept whole as one unit."""
    if isinstance(module, nn.ModuleList) or flatten is True:  # a ModuleList cannot run as one unit
        return True
    if flatten is False:
        return False
    entries = _entries(module)
    return not entries or not all(_is_layer(child) for _, child in entries)  # a layer group is kept whole


def _flatten(module: nn.Module, name: str, out: list[tuple[str, nn.Module]], flatten: bool | str,
             top: bool = False) -> None:
    """Append the units of ``module`` (named from ``name``) to ``out`` in forward order."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"split: expected nn.Module units, got {type(module).__name__} at {name or 'the top level'}")
    if _is_container(module) and (top or _read_as_container(module, flatten)):
        for child_name, child in _entries(module):
            _flatten(child, f"{name}.{child_name}" if name else child_name, out, flatten)
        return
    if isinstance(module, nn.ModuleDict):
        raise TypeError(f"split: cannot infer the forward order of the nn.ModuleDict at {name or 'the top level'}; "
                        f"supported: {_SUPPORTED}")
    out.append((name or type(module).__name__, module))


def _units(model: nn.Module | Sequence[nn.Module], flatten: bool | str) -> list[tuple[str, nn.Module]]:
    """The model's units in forward order, with their qualified names."""
    out: list[tuple[str, nn.Module]] = []
    if isinstance(model, (list, tuple)):
        for i, module in enumerate(model):
            _flatten(module, str(i), out, flatten)
    elif callable(getattr(model, "split_units", None)):
        names = {id(m): n for n, m in model.named_modules() if n}
        for module in model.split_units():
            _flatten(module, names.get(id(module), type(module).__name__), out, flatten)
    elif _is_container(model):
        _flatten(model, "", out, flatten, top=True)
    elif isinstance(model, nn.Module) and (traced := _traceable(model)) is not None:
        out.extend(_traced_units(traced))
    elif isinstance(model, nn.Module):
        children = [f"self.{name}" for name, _ in model.named_children()]
        template = ", ".join(children[:8]) + (", ..." if len(children) > 8 else "")
        raise TypeError(f"split: cannot infer the forward order of {type(model).__name__} (an nn.Module with its own "
                        f"forward that torch.fx cannot trace: {_trace_error(model)}); supported: {_SUPPORTED}. "
                        f"Give {type(model).__name__} a method "
                        f"`def split_units(self): return [{template}]` listing its parts in the order forward runs "
                        "them, so that chaining them computes model(x): what forward computes outside a submodule "
                        "(torch.flatten, F.relu, a class token or positional embedding added) must become a module "
                        "in that list (nn.Flatten(), nn.ReLU(), a module holding the parameters)")
    else:
        raise TypeError(f"split: cannot infer the forward order of {type(model).__name__} (not an nn.Module); "
                        f"supported: {_SUPPORTED}")
    return out


class TracedUnit(torch.fx.GraphModule):
    """A piece of a traced model's forward (:func:`trace_units`): a ``GraphModule`` of one input and one output that
    holds the model's own submodules and parameters (not copies)."""


class TracedPassThrough(TracedUnit):
    """A traced piece that only reshapes, indexes, concatenates or adds (``torch.flatten``, ``x.transpose``, a class
    token concatenated, a positional embedding added): it keeps an affine map affine, so it is a pass-through for
    the rule that a module may not end on an affine layer."""


class TracedAffine(TracedUnit):
    """A traced piece that ends on an affine function of its own (``F.linear``, ``F.conv2d``, ``F.layer_norm``,
    ``x @ self.weight``): for the rule that a module may not end on an affine layer it is one."""


_F = torch.nn.functional
# Functions and tensor methods that compute an affine map of their input: a piece ending on one is a TracedAffine.
_AFFINE = {getattr(_F, name) for name in (
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "batch_norm",
    "instance_norm", "layer_norm", "group_norm", "rms_norm", "embedding", "embedding_bag") if hasattr(_F, name)}
_AFFINE |= {torch.matmul, torch.mm, torch.bmm, torch.einsum, torch.addmm, operator.matmul, torch.conv1d, torch.conv2d,
            torch.conv3d}
_AFFINE_METHODS = {"matmul", "mm", "bmm", "__matmul__"}

# Functions and tensor methods that keep an affine map affine: a piece made of them only is a pass-through.
_PASS_THROUGH = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                 torch.t, torch.movedim, torch.cat, torch.stack, torch.add, torch.sub, operator.add, operator.sub,
                 operator.getitem, operator.neg, getattr}
_PASS_THROUGH_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "permute", "transpose", "t",
                         "contiguous", "movedim", "view_as", "reshape_as", "size", "dim", "expand", "expand_as",
                         "add", "sub", "__getitem__"}
_trace_errors: dict[int, str] = {}


class _ModeTracer(torch.fx.Tracer):
    """fx's tracer, noting whether an operation was recorded where the forward had switched gradients, inference
    mode or autocast (``with torch.no_grad():``): a graph does not record the switch, so its pieces would differ."""

    def __init__(self) -> None:
        super().__init__()
        self.modes = _grad_modes()
        self.switched = False

    def create_node(self, *args, **kwargs) -> torch.fx.Node:
        self.switched = self.switched or _grad_modes() != self.modes
        return super().create_node(*args, **kwargs)


def _grad_modes() -> tuple[bool, ...]:
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu"),
            torch.is_autocast_enabled("cuda"))


def _graph_structure(graph: torch.fx.Graph) -> list[tuple]:
    # Nodes by position (the names of tensor constants differ from one trace to the next).
    index = {n: i for i, n in enumerate(graph.nodes)}
    return [(n.op, None if n.op == "get_attr" else n.target, *torch.fx.node.map_arg((n.args, n.kwargs), index.get))
            for n in graph.nodes]


def _drop_defaulted_inputs(graph: torch.fx.Graph) -> None:
    """Remove the placeholders fx made for the arguments traced at their defaults (``mask=None``) with the checks
    fx hung on them, so that the graph is of its first input only (forward's body already used the defaults)."""
    # (fx's own check of a None default is private: looked up, so that a torch without it still traces)
    checks = (torch._assert, operator.eq, getattr(torch.fx._symbolic_trace, "_assert_is_none", torch._assert))
    for node in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        reached, found = {node}, [node]
        while found:
            found = [user for n in found for user in n.users]
            reached.update(found)
        if node.args and all(n is node or (n.op == "call_function" and n.target in checks) for n in reached):
            for n in [n for n in reversed(graph.nodes) if n in reached]:  # users before what they use
                graph.erase_node(n)


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    """``model``'s forward as a ``GraphModule``, its arguments after the first at their defaults. Traced in training
    and in evaluation mode: a TypeError when the two differ (fx fixes ``self.training`` at trace time) or when the
    forward switches gradients off or on (fx does not record ``torch.no_grad()``)."""
    if isinstance(model, torch.fx.GraphModule):
        return model
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    modules = list(model.modules())
    flags = [m.training for m in modules]
    graphs = []
    try:
        for training in (True, False):
            for m in modules:
                m.training = training
            tracer = _ModeTracer()
            graphs.append(tracer.trace(model, concrete_args=defaults or None))
            if tracer.switched:
                raise TypeError("its forward switches gradients, inference mode or autocast for part of it "
                                "(torch.no_grad(), autocast), which a torch.fx graph does not record")
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag
    if _graph_structure(graphs[0]) != _graph_structure(graphs[1]):
        raise TypeError("its forward reads self.training (F.dropout(x, p, self.training), a branch on the mode), "
                        "which torch.fx fixes at trace time: use modules for what changes between training and "
                        "evaluation (nn.Dropout)")
    graph = graphs[0 if model.training else 1]
    _drop_defaulted_inputs(graph)
    return _non_persistent_kept(torch.fx.GraphModule(model, graph, class_name=type(model).__name__), model)


def _non_persistent_kept(module: torch.fx.GraphModule, source: nn.Module) -> torch.fx.GraphModule:
    """Mark the buffers ``module`` fetched from ``source`` non-persistent where they are there (fx registers them
    all as persistent: a causal mask would enter the state_dict)."""
    for node in module.graph.nodes:
        if node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            if name in source.get_submodule(owner)._non_persistent_buffers_set:
                module.get_submodule(owner)._non_persistent_buffers_set.add(name)
    return module


def _traceable(model: nn.Module) -> torch.fx.GraphModule | None:
    """``model`` traced by ``torch.fx`` (:func:`_trace`) where that gives a graph of one input, else None (the reason
    is kept for the error). The caller cuts this trace (:func:`_traced_units`) rather than tracing again."""
    try:
        first = next(iter(inspect.signature(model.forward).parameters.values()), None)
    except (TypeError, ValueError):
        first = None
    if first is None or first.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        # (forward(self, *xs) traced as one tuple input: the pieces would index the batch instead of the tuple)
        _trace_errors[id(model)] = "its forward does not take one tensor as its first positional argument"
        return None
    try:
        traced = _trace(model)
    except Exception as error:  # fx raises many kinds (control flow on tensors, unsupported calls)
        _trace_errors[id(model)] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return None
    inputs = [node for node in traced.graph.nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        _trace_errors[id(model)] = f"its forward takes {len(inputs)} inputs, not one"
        return None
    return traced


def _trace_error(model: nn.Module) -> str:
    return _trace_errors.pop(id(model), "not tried")


# Functions that write into their first argument (``x += y``, ``x[i] = y``).
_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
             operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
             operator.irshift, operator.setitem}


def _hands_on_a_tensor(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value is, as far as the graph tells, a tensor: not a size (``x.shape``, ``x.size(1)``) and
    not a tuple that is unpacked (an LSTM's output and state, ``x.chunk(2)``, ``x.max(1).values``)."""
    if ((node.op == "call_function" and node.target in (getattr, len))
            or (node.op == "call_method" and node.target in ("size", "dim", "numel", "item", "tolist"))):
        return False
    return not node.users or not all(
        user.op == "call_function" and ((user.target is operator.getitem and isinstance(user.args[1], int))
                                        or (user.target is getattr and user.args[1] in ("values", "indices")))
        for user in node.users)


def _writes_into(node: torch.fx.Node, value: torch.fx.Node) -> bool:
    """Whether ``node`` modifies ``value`` in place (``value.relu_()``, ``value += y``, ``F.relu(value, inplace=True)``,
    an ``nn.ReLU(inplace=True)`` called on it)."""
    if not node.args or node.args[0] is not value:
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    trailing_underscore = isinstance(name, str) and name.endswith("_") and not name.endswith("__")  # x.add_, F.relu_
    if node.op == "call_method":
        return trailing_underscore
    if node.op == "call_function":
        return trailing_underscore or node.target in _IN_PLACE or node.kwargs.get("inplace") is True
    if node.op == "call_module" and node.graph.owning_module is not None:
        return getattr(node.graph.owning_module.get_submodule(node.target), "inplace", False) is True
    return False


def _cut_points(graph: torch.fx.Graph) -> tuple[list[torch.fx.Node], list[int]]:
    """The graph's computing nodes in order, and the positions ``i`` after which exactly one value (node ``i``'s)
    is still needed: there the forward is a chain link, and a cut leaves one tensor to hand on. Never where that
    value is not a tensor (an LSTM's output and state) or where a later piece would modify it in place: the
    previous module's output (LocalNet's boundary) must stay as that module computed it."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    position = {n: i for i, n in enumerate(nodes)}
    for n in graph.nodes:
        if n.op == "placeholder":
            position[n] = -1
    last_use: dict[torch.fx.Node, int] = {}
    for n in graph.nodes:
        use = len(nodes) if n.op == "output" else position.get(n)
        if use is None:  # a get_attr node: parameters are fetched where they are used, never handed on
            continue
        for arg in n.all_input_nodes:
            if arg.op != "get_attr":
                last_use[arg] = max(last_use.get(arg, -1), use)
    cuts = []
    live: set[torch.fx.Node] = {n for n in graph.nodes if n.op == "placeholder"}
    for i, n in enumerate(nodes):
        live.add(n)
        live = {m for m in live if last_use.get(m, -1) > i}
        if (live == {n} and i < len(nodes) - 1 and _hands_on_a_tensor(n)
                and not any(_writes_into(user, n) for user in n.users)):
            cuts.append(i)
    return nodes, cuts


def _piece(traced: torch.fx.GraphModule, nodes: list[torch.fx.Node], source: torch.fx.Node,
           result: torch.fx.Node | None) -> nn.Module:
    """The nodes as a module of one input (``source``'s value) returning ``result``'s value (the whole output for
    the last piece): a call of one of the model's modules on its input is that module itself."""
    output = next(n for n in traced.graph.nodes if n.op == "output")
    returned = result if result is not None else output.args[0]
    if (len(nodes) == 1 and nodes[0].op == "call_module" and nodes[0].args == (source,) and not nodes[0].kwargs
            and returned is nodes[0]):
        return traced.get_submodule(nodes[0].target)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {source: graph.placeholder("x")}

    def arg(node: torch.fx.Node) -> torch.fx.Node:
        if node not in env:  # a parameter or buffer fetched by get_attr: fetched again in this piece
            env[node] = graph.node_copy(node)
        return env[node]

    for node in nodes:
        env[node] = graph.node_copy(node, arg)
    graph.output(torch.fx.node.map_arg(returned, arg))
    passes = all((n.op == "call_function" and n.target in _PASS_THROUGH)
                 or (n.op == "call_method" and n.target in _PASS_THROUGH_METHODS) for n in nodes)
    affine = isinstance(returned, torch.fx.Node) and (
        (returned.op == "call_function" and returned.target in _AFFINE)
        or (returned.op == "call_method" and returned.target in _AFFINE_METHODS))
    kind = TracedPassThrough if passes else TracedAffine if affine else TracedUnit
    return _non_persistent_kept(kind(traced, graph, class_name=kind.__name__), traced)


def _piece_name(nodes: list[torch.fx.Node]) -> str:
    """A readable name: the common prefix of the pieces' module names when it calls all of that module (``layer1.0``
    for a traced block), else the first and last node's names (a module's own name for a module)."""
    targets = [str(n.target).split(".") for n in nodes if n.op == "call_module"]
    if targets:
        common = []
        for parts in zip(*targets, strict=False):
            if len(set(parts)) > 1:
                break
            common.append(parts[0])
        prefix, owner = ".".join(common), nodes[0].graph.owning_module
        if common and len(nodes) == 1:
            return prefix
        if common and len(targets) > 1:
            # the module's name when the piece calls all of it (a Sequential's BatchNorm and ReLU are not "features")
            leaves = set() if owner is None else {f"{prefix}.{name}" for name, m in owner.get_submodule(prefix)
                                                  .named_modules() if name and next(m.children(), None) is None}
            if leaves <= {".".join(t) for t in targets}:
                return prefix
    names = [str(n.target) if n.op == "call_module" else n.name for n in nodes]
    return names[0] if len(names) == 1 else f"{names[0]}…{names[-1]}"


def _traced_units(traced: torch.fx.GraphModule) -> list[tuple[str, nn.Module]]:
    """The pieces of a model's trace (:func:`_traceable`'s), with their names."""
    nodes, cuts = _cut_points(traced.graph)
    source = next(n for n in traced.graph.nodes if n.op == "placeholder")
    units, start = [], 0
    for end in [*cuts, len(nodes) - 1]:
        piece = nodes[start:end + 1]
        last = end == len(nodes) - 1
        units.append((_piece_name(piece), _piece(traced, piece, source, None if last else nodes[end])))
        source, start = nodes[end], end + 1
    if not nodes:  # a forward that computes nothing
        return []
    return units


def trace_units(model: nn.Module) -> list[nn.Module]:
    """``model``'s forward as a chain of pieces, read by ``torch.fx``: chained, they compute ``model(x)``.

    The forward is traced into a graph (its arguments after the first at their defaults: ``forward(self, x,
    mask=None)`` is read as ``forward(x)``) and cut after every operation past which exactly one value is still
    needed, so a residual block (its input is needed again at the sum) is one piece; never where that value is a
    tuple (an LSTM's output and state) or a size, nor where a later piece would write into it in place (an
    ``nn.ReLU(inplace=True)`` stays with what it rectifies). A piece that calls one of the model's modules on its
    input is that module; any other is a :class:`TracedUnit` (a ``torch.fx.GraphModule`` holding the model's own
    submodules and parameters), a :class:`TracedPassThrough` when it only reshapes, indexes, concatenates or
    adds, or a :class:`TracedAffine` when it ends on an affine function (``F.linear``, ``x @ self.weight``).
    :func:`split` uses this for a model with its own ``forward``; call it yourself to drop pieces first:
    ``split(trace_units(model)[:-1], k, ...)`` splits the model without its classifier.

    Raises:
        TypeError: when ``torch.fx`` cannot trace the model (control flow on tensor values, for one), its forward
            takes more than one input without a default, reads ``self.training`` (``F.dropout(x, p,
            self.training)``: fx would fix the mode of the trace) or switches gradients off for a part
            (``torch.no_grad()``: fx would drop it); give the model a ``split_units()`` method then (see
            :func:`split`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_units: expected an nn.Module, got {type(model).__name__}")
    traced = _traceable(model)
    if traced is None:
        raise TypeError(f"trace_units: torch.fx cannot trace {type(model).__name__} ({_trace_error(model)}); give it "
                        "a split_units() method listing its parts in forward order instead")
    return [unit for _, unit in _traced_units(traced)]


def _last_layer(module: nn.Module, name: str = "") -> tuple[str, nn.Module] | None:
    """The last layer of ``module`` that is not a linear pass-through (``LINEAR_PASSTHROUGH``), reading into plain
    containers (a block is its own last layer), with its qualified name; None when there is none."""
    if _is_container(module):
        for child_name, child in reversed(_entries(module)):
            found = _last_layer(child, f"{name}.{child_name}" if name else child_name)
            if found is not None:
                return found
        return None
    if isinstance(module, (*LINEAR_PASSTHROUGH, TracedPassThrough)):
        return None
    if isinstance(module, TracedUnit):  # a piece ending on a call of one of the model's modules ends on that module
        returned = next(n for n in module.graph.nodes if n.op == "output").args[0]
        if isinstance(returned, torch.fx.Node) and returned.op == "call_module":
            return _last_layer(module.get_submodule(returned.target), f"{name}:{returned.target}")
    return name or type(module).__name__, module


def _admissible_boundaries(named: list[tuple[str, nn.Module]], allow_affine_end: bool) -> list[int]:
    """The unit indices where a module may end: ``[0, ..., n]``. A cut after unit ``b - 1`` is admissible when the
    last layer before it (pass-throughs skipped, across units) exists and is not affine; the model's end always is."""
    bounds, last = [0], None
    for b, (name, unit) in enumerate(named, start=1):
        last = _last_layer(unit, name) or last
        if b == len(named) or allow_affine_end or (last is not None
                                                    and not isinstance(last[1], (*AFFINE_LAYERS, TracedAffine))):
            bounds.append(b)
    return bounds


def _classifier_at_end(named: list[tuple[str, nn.Module]]) -> tuple[str, nn.Module] | None:
    """The model's last layer (pass-throughs skipped) when it is an ``nn.Linear``, with its name; else None."""
    for name, unit in reversed(named):
        found = _last_layer(unit, name)
        if found is not None:
            return found if isinstance(found[1], nn.Linear) else None
    return None


class TooManyModulesError(ValueError):
    """:func:`split` was asked for more modules than the model has admissible places to cut (``possible``).

    A ``ValueError``; its message names the options (``flatten``, ``allow_affine_end``) that allow more."""

    def __init__(self, message: str, k: int | None = None, possible: int | None = None) -> None:
        super().__init__(message)
        self.k, self.possible = k, possible


def _too_many_modules(model: nn.Module | Sequence[nn.Module], k: int, n: int, possible: int,
                      flatten: bool | str, allow_affine_end: bool) -> TooManyModulesError:
    """The error for a ``k`` above the ``possible`` modules, naming the options that allow more."""
    options: list[tuple[str, int]] = []
    if flatten is not True:
        flat = _units(model, True)
        options.append(("flatten=True (cut inside nested nn.Sequentials, after their nonlinearities)",
                        len(_admissible_boundaries(flat, allow_affine_end)) - 1))
    if not allow_affine_end:
        options.append(("allow_affine_end=True (cut after any unit)", n))
        if flatten is not True and len(flat) > max(count for _, count in options):
            options.append(("both", len(flat)))
    more = [f"with {option}: {count} modules" for option, count in options if count > possible]
    rules = {True: "units are whole blocks and single layers",
             False: "units are whole blocks and whole nested nn.Sequentials (flatten=False)",
             "auto": "units are whole blocks and layer groups (nested nn.Sequentials of single layers)"}[flatten]
    if (isinstance(model, nn.Module) and not _is_container(model)
            and not callable(getattr(model, "split_units", None))):
        rules = ("units are the pieces of its forward traced by torch.fx, which is cut only where one tensor flows "
                 "on: a skip connection (a U-Net's), or a value used further on (a mask built once in forward), keeps "
                 "everything it spans in one piece")
    if not allow_affine_end:
        rules += (", and a module may not end on an affine layer (Linear, Conv, BatchNorm, ...) without a "
                  "nonlinearity after it")
    return TooManyModulesError(f"split: cannot cut {type(model).__name__} into k={k} modules: at most {possible} are "
                               f"possible ({n} units; {rules}). "
                               + ("More " + "; ".join(more) + "." if more else f"k must be at most {possible}."),
                               k, possible)


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
        if handle is not tensor and self.per_unit:  # the meter counted these storages (a sparse tensor has several)
            self.per_unit[-1].update((key, self._sizes[key]) for key in handle.keys)
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
        # a lazy norm layer's statistics do not exist yet, so they cannot be copied: reset them on the way out
        self.lazy_norms = [m for m in self.modules if isinstance(m, _NormBase)
                           and any(isinstance(b, nn.parameter.UninitializedBuffer) for b in m.buffers(recurse=False))]
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
            for norm in self.lazy_norms:
                if not nn.parameter.is_lazy(norm.running_mean if norm.running_mean is not None else norm.weight):
                    norm.reset_running_stats()


def _detached(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def _saved_keys_per_unit(named: list[tuple[str, nn.Module]], params: list[torch.Tensor],
                         example_input: torch.Tensor) -> tuple[list[dict[tuple, int]], int, list[int | None]]:
    """Run the chain once with gradients; return the storages each unit saves, the end-to-end peak, and the first
    unit that wrote each unit's input in place (None: none did).

    Raises a TypeError naming the unit when one returns something other than a tensor (the next module's
    input and every module's head need one), and names the unit in any error raised while running it."""
    recorder = _KeyRecorder(exclude=params)
    h = _detached(example_input)
    outputs = []  # kept so that no saved storage is freed and its address reused during the run
    # each unit's input and its version when the unit started, checked after every unit: an input may be written by
    # a later unit (a pass-through unit, nn.Identity or a view, then an in-place ReLU)
    inputs: list[tuple[torch.Tensor, int]] = []
    writers: list[int | None] = []
    with torch.enable_grad(), recorder:
        for j, (name, unit) in enumerate(named):
            recorder.per_unit.append({})
            inputs.append((h, h._version))
            writers.append(None)
            try:
                h = unit(h)
            except Exception as error:
                if hasattr(error, "add_note"):  # Python >= 3.11
                    error.add_note(f"split: raised by unit {name} ({type(unit).__name__}) on example_input's batch "
                                   f"of shape {tuple(example_input.shape)}, run in training mode")
                raise
            if not isinstance(h, torch.Tensor):
                raise TypeError(f"split: expected every unit to return a tensor (the next module's input and the "
                                f"features for a head), got {type(h).__name__} from unit {name} "
                                f"({type(unit).__name__}); wrap it in an nn.Module whose forward returns one tensor "
                                "(for an LSTM, its output without the state: `return self.lstm(x)[0]`)")
            outputs.append(h)
            for i, (tensor, version) in enumerate(inputs):
                if writers[i] is None and tensor._version != version:
                    writers[i] = j
    keys, peak = recorder.per_unit, recorder.peak_saved_bytes
    del outputs, h, inputs  # drops the graph; the recorder releases its handles
    return keys, peak, writers


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


def _unit_times(units: list[nn.Module], example_input: torch.Tensor, repeats: int = 3) -> list[float]:
    """Each unit's forward + backward seconds on ``example_input`` (the least of ``repeats`` runs after one
    warm-up: other work on the machine only adds time), each on its predecessor's detached output so that its
    backward is its own. The parameters' ``.grad`` are left as they were."""
    params = list({id(p): p for unit in units for p in unit.parameters()}.values())
    grads = [p.grad for p in params]
    synchronize = torch.cuda.synchronize if example_input.device.type == "cuda" else (lambda: None)
    runs: list[list[float]] = [[] for _ in units]
    try:
        with torch.enable_grad():
            for repeat in range(repeats + 1):
                h = example_input.detach()
                for i, unit in enumerate(units):
                    x = h.detach().requires_grad_(h.is_floating_point())
                    if x.requires_grad:  # not a leaf: a unit may write into its input (nn.ReLU(inplace=True))
                        x = x.clone()
                    synchronize()
                    started = time.perf_counter()
                    out = unit(x)
                    if out.requires_grad:
                        out.backward(torch.ones_like(out))
                    synchronize()
                    if repeat:
                        runs[i].append(time.perf_counter() - started)
                    h = out.detach()
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
    return [min(r) for r in runs]


def _chain_difference(model: nn.Module, units: list[nn.Module], example_input: torch.Tensor) -> str | None:
    """How chaining ``units`` differs from ``model(example_input)`` in eval mode, or None when it does not (or
    when the two cannot be compared: the model's output is not a tensor of the chain's shape, the model needs
    other arguments, or the tensors are on the meta device). Modes are restored; no gradient is recorded."""
    modules = list({id(m): m for top in [model, *units] for m in top.modules()}.values())
    flags = [m.training for m in modules]
    try:
        model.eval()
        for unit in units:
            unit.eval()
        with torch.no_grad():
            try:
                expected = model(example_input)
            except Exception:  # a forward with other arguments: nothing to compare with
                return None
            h = example_input
            for unit in units:
                h = unit(h)
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag
    if (not isinstance(expected, torch.Tensor) or expected.shape != h.shape or expected.dtype != h.dtype
            or expected.device.type == "meta"):
        return None
    try:
        torch.testing.assert_close(h, expected, rtol=1e-3, atol=1e-3, equal_nan=True)
    except AssertionError:
        return f"largest difference {(h.double() - expected.double()).abs().max().item():.3g}"
    return None


def _numel(p: torch.Tensor) -> int:
    if isinstance(p, nn.parameter.UninitializedParameter):
        raise ValueError("split: the model has uninitialised (lazy) parameters; run it once, or pass "
                         "example_input, before splitting by params")
    return p.numel()


def split(model: nn.Module | Sequence[nn.Module], k: int, *, by: str = "saved_bytes",
          example_input: torch.Tensor | None = None, flatten: bool | str = "auto",
          allow_affine_end: bool = False) -> SplitPlan:
    """Cut ``model`` into ``k`` contiguous modules balanced by ``by``, never inside a block and never right after an
    affine layer (see the module docstring for the rules).

    Args:
        model: an ``nn.Sequential``, an ``nn.ModuleList`` or list of modules, or a model with a ``split_units()``
            method returning its entries in forward order (transformer stacks: ``[embed, blocks, head]``).
        k: the number of modules, 1 ≤ k ≤ the number of admissible groups (an error says how many there are
            and which option allows more).
        by: ``"layers"`` (equal unit counts), ``"params"`` (balanced parameter counts), ``"saved_bytes"``
            (balanced bytes saved for backward, measured on ``example_input``; the default) or ``"time"``
            (balanced forward + backward time of the units, measured on ``example_input``: for a pipeline,
            which runs at the speed of its slowest stage; :class:`llkern.PipelineTrainer`).
        example_input: a batch for the model; required by ``by="saved_bytes"``. When given, the plan also
            reports every module's measured saved bytes, whatever ``by`` is. The model runs in training
            mode under gradients for the measurement; its modes, buffers (BatchNorm statistics) and the
            RNG state are restored afterwards, and no gradient is computed.
        flatten: how nested plain ``nn.Sequential`` entries are read. ``"auto"`` (default): one whose entries are
            all layers (modules without submodules, as ``Sequential(Conv, BN, ReLU)``) is one unit, kept whole;
            one that holds blocks or Sequentials (a stage of residual blocks) is read as its entries, recursively.
            ``True``: every one is read as its entries, down to single layers (the planner's behaviour before
            layer groups were kept whole). ``False``: every one is a unit. ``nn.ModuleList`` entries are always
            read as their entries.
        allow_affine_end: admit cuts right after an affine layer (``Linear``, ``Conv*``, normalisation,
            ``Embedding``; pass-through layers such as ``Flatten``, dropout and average pooling in between do not
            count), so that a module may end without a nonlinearity. Default False.

    Returns:
        a :class:`SplitPlan`; ``plan.modules`` share the model's parameters and, chained, compute ``model(x)``.

    Raises:
        TooManyModulesError: (a ``ValueError``) for a ``k`` above the admissible groups.
        ValueError: for an unknown ``by``, a ``k`` below 1, ``by="saved_bytes"``
            without ``example_input``, or a bad ``flatten`` / ``allow_affine_end``.
        TypeError: for a model whose forward order cannot be read (the message suggests a ``split_units()``),
            an ``example_input`` that is not a tensor, or a unit that returns something other than a tensor.

    Warns:
        UserWarning: when the model ends in an ``nn.Linear`` (its classifier): LocalNet would put another head
            after it; and when chaining a model's ``split_units()`` does not compute ``model(example_input)`` in
            eval mode (a step of its forward outside the listed modules).
    """
    if by not in MEASURES:
        raise ValueError(f"split: by must be one of {', '.join(map(repr, MEASURES))}, got {by!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"split: expected k >= 1 modules, got {k!r}")
    if not (flatten is True or flatten is False or (isinstance(flatten, str) and flatten == "auto")):
        raise ValueError(f"split: flatten must be 'auto', True or False, got {flatten!r}")
    if not isinstance(allow_affine_end, bool):
        raise ValueError(f"split: allow_affine_end must be True or False, got {allow_affine_end!r}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"split: expected example_input to be a torch.Tensor (a batch for the model's first unit), "
                        f"got {type(example_input).__name__}")
    if by in ("saved_bytes", "time") and example_input is None:
        raise ValueError(f"split: by={by!r} measures each unit on an example batch: pass example_input=<a batch>, "
                         "or use by='layers' or by='params'")
    named = _units(model, flatten)
    n = len(named)
    if n == 0:
        raise ValueError(f"split: {type(model).__name__} has no units to split")
    admissible = _admissible_boundaries(named, allow_affine_end)
    if k > len(admissible) - 1:
        raise _too_many_modules(model, k, n, len(admissible) - 1, flatten, allow_affine_end)
    classifier = _classifier_at_end(named)
    traced = (isinstance(model, nn.Module) and not _is_container(model)
              and not callable(getattr(model, "split_units", None)))
    without = "llkern.trace_units(model)[:-1] for this traced model" if traced else "model[:-1]"
    if classifier is not None:
        warnings.warn(
            f"split: the model ends in an nn.Linear, probably its classifier ({classifier[0]}: {classifier[1]}); "
            "LocalNet puts an auxiliary head after every module, the last one included, so that head would be a "
            f"second classifier stacked on this one. Split the model without its classifier (e.g. {without}, keeping "
            "the pooling and flatten before it) and let the last module's head classify, or give LocalNet heads of "
            "your own", UserWarning, stacklevel=2)
    names = [name for name, _ in named]
    units = [unit for _, unit in named]
    params = list({id(p): p for unit in units for p in unit.parameters()}.values())

    keys: list[dict[tuple, int]] | None = None
    total = writers = None
    # The measurements run outside inference mode (where autograd would save nothing: every cost 0).
    if example_input is not None:
        # A copy with its own storage: the meter counts whole storages, so a slice x[:32] of a training set would
        # charge the whole set to the first unit that saves its input (and skew the plan); outside inference mode,
        # since an inference tensor cannot be saved for backward.
        with torch.inference_mode(False):
            example_input = example_input.detach().clone()
        with torch.inference_mode(False), _TrainModeNoSideEffects(units, example_input.device):
            keys, total, writers = _saved_keys_per_unit(named, params, example_input)
        params = list({id(p): p for unit in units for p in unit.parameters()}.values())  # lazy ones now exist
        if isinstance(model, nn.Module) and not _is_container(model):  # split_units() or a traced forward
            with torch.inference_mode(False):
                difference = _chain_difference(model, units, example_input)
            if difference is not None and callable(getattr(model, "split_units", None)):
                warnings.warn(
                    f"split: chaining {type(model).__name__}.split_units() does not compute model(example_input) "
                    f"in eval mode ({difference}), so the modules compute another function than the model: does "
                    "forward compute something outside the listed modules (torch.flatten, F.relu, a class token or "
                    "positional embedding added)? Make each such step a module in split_units()", UserWarning,
                    stacklevel=2)
            elif difference is not None:
                warnings.warn(
                    f"split: chaining the pieces that torch.fx traced in {type(model).__name__} does not compute "
                    f"model(example_input) in eval mode ({difference}); the trace missed part of forward (a "
                    "Python-level branch or side effect): give the model a split_units() method", UserWarning,
                    stacklevel=2)

    # Each unit's cost as a dict key -> amount; a group costs the sum over the union of its units' keys,
    # so a storage saved by two units (a ReLU's output, saved again by the next conv) or a tied
    # parameter counts once per group, as the meter counts it.
    if by == "layers":
        unit_sets = [{i: 1} for i in range(n)]
    elif by == "params":
        unit_sets = [{id(p): _numel(p) for p in unit.parameters()} for unit in units]
    elif by == "time":
        with torch.inference_mode(False), _TrainModeNoSideEffects(units, example_input.device):
            unit_sets = [{i: t} for i, t in enumerate(_unit_times(units, example_input))]
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
    # The partition runs over the admissible boundaries only: its group (i, j) is units admissible[i]..admissible[j]-1.
    chosen = linear_partition(lambda i, j: table[admissible[i]][admissible[j]], len(admissible) - 1, k)
    bounds = [admissible[b] for b in chosen]

    modules = [nn.Sequential(*units[bounds[m]:bounds[m + 1]]) for m in range(k)]
    costs = [table[bounds[m]][bounds[m + 1]] for m in range(k)]
    module_params = [sum(_numel(p) for p in {id(p): p for p in module.parameters()}.values()) for module in modules]
    saved = None
    if example_input is not None:
        with torch.inference_mode(False), _TrainModeNoSideEffects(units, example_input.device):
            saved = _measure_modules(modules, params, example_input)
    return SplitPlan(modules=modules, by=by, costs=costs, boundaries=bounds, unit_names=names,
                     unit_costs=[sum(s.values()) for s in unit_sets], params=module_params,
                     saved_bytes=saved, total_saved_bytes=total,
                     example_batch=None if example_input is None else int(example_input.shape[0]),
                     unit_input_writers=writers)
