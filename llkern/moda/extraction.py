"""MODA: per-class masks of a trained model's units and the extraction of per-class sub-networks.

See llkern/moda/__init__.py for the method.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from llkern.moda.activations import ActivationCollector, relu_modules, unit_activations
from llkern.moda.loss import MODALocalLoss
from llkern.models.moda_cnn import ResidualReLUBlock


@dataclass
class ClassMasks:
    """What :func:`class_masks` measured. ``masks[c][l]`` is the boolean unit mask of class c at ReLU
    layer ``layers[l]``; ``frequency[c][l]`` the fraction of class c's samples on which each unit is
    active; ``input_shape`` one sample's shape (for sizing a flatten)."""

    layers: list[str]
    masks: dict[int, list[torch.Tensor]]
    frequency: dict[int, list[torch.Tensor]]
    counts: dict[int, int]
    input_shape: tuple[int, ...]
    tau: float
    min_keep: float

    @property
    def classes(self) -> list[int]:
        return sorted(self.masks)

    def union(self, classes: Iterable[int]) -> list[torch.Tensor]:
        """The union of the classes' masks, layer by layer."""
        classes = _check_classes("ClassMasks.union", classes, self)
        out = [m.clone() for m in self.masks[classes[0]]]
        for c in classes[1:]:
            for u, m in zip(out, self.masks[c], strict=True):
                u |= m
        return out


def _check_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(x, y)`` batch, checked: ``y`` holds one integer label >= 0 per sample of ``x``."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch)):
        raise TypeError(f"class_masks: expected each batch to be a pair (x, y) of tensors, got "
                        f"{type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    x, y = batch
    if y.dim() != 1 or x.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"class_masks: expected labels y of shape [B] for x of shape (B, ...), got y of shape "
                         f"{list(y.shape)} and x of shape {list(x.shape)}")
    if y.dtype.is_floating_point or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"class_masks: expected integer labels y, got {y.dtype}")
    if len(y) and int(y.min()) < 0:  # (a negative class became a mask that extract indexed from the end)
        raise ValueError(f"class_masks: expected labels y >= 0 (every sample of a class), got {int(y.min())}")
    return x, y


def _batches(data: object, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"class_masks: expected batch_size to be an int >= 1, got {batch_size!r}")
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"class_masks: expected data (x, y) with as many labels as samples, got "
                             f"{x.shape[0]} samples and {y.shape[0]} labels")
        return zip(x.split(batch_size), y.split(batch_size), strict=True)
    if isinstance(data, Iterable):
        return data
    raise TypeError(f"class_masks: expected data to be a tuple (x, y) of tensors or an iterable of (x, y) batches, "
                    f"got {type(data).__name__}")


@torch.no_grad()
def class_masks(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor] | Iterable, tau: float = 0.9,
                min_keep: float = 0.005, batch_size: int = 256) -> ClassMasks:
    """Per class, the units of every ReLU layer active on at least ``tau`` of the class's samples.

    A unit is active on a sample when its activation (a conv channel's mean ``|activation|`` over
    space) is not 0. Every layer keeps at least ``max(1, ceil(min_keep · N_l))`` units per class, the
    most frequently active ones (ties to the lower index). The model runs in eval mode (BatchNorm
    uses its running statistics); its mode is restored afterwards.

    Args:
        model: the trained network; every ``nn.ReLU`` module must run once per forward.
        data: training samples, ``(x, y)`` tensors or an iterable of ``(x, y)`` batches (a DataLoader).
        tau: activation-frequency threshold in (0, 1] (MODA's 0.9).
        min_keep: the smallest fraction of a layer kept, in [0, 1] (0.5%).
        batch_size: batch size when ``data`` is a pair of tensors.
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < tau <= 1.0:
        raise ValueError(f"class_masks: expected tau in (0, 1], got {tau!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or not 0.0 <= min_keep <= 1.0:
        raise ValueError(f"class_masks: expected min_keep in [0, 1], got {min_keep!r}")
    layers = [name for name, _ in relu_modules(model)]
    if not layers:
        raise ValueError(f"class_masks: model ({type(model).__name__}) has no nn.ReLU module")
    was_training = model.training
    model.eval()
    active: dict[int, list[torch.Tensor]] = {}
    counts: dict[int, int] = {}
    input_shape: tuple[int, ...] | None = None
    try:
        for batch in _batches(data, batch_size):
            x, y = _check_batch(batch)
            if not len(y):
                continue
            input_shape = tuple(x.shape[1:])
            with ActivationCollector(model) as collected:
                model(x)
            if collected.names != layers:
                raise ValueError("class_masks: every nn.ReLU module of the model must run exactly once per forward, "
                                 f"in registration order {layers}; ran {collected.names}")
            on = [(unit_activations(a) != 0) for a in collected.activations]
            for c in y.unique().tolist():
                rows = y == c
                sums = [o[rows].sum(dim=0) for o in on]
                if c in active:
                    active[c] = [s + t for s, t in zip(active[c], sums, strict=True)]
                else:
                    active[c] = sums
                counts[c] = counts.get(c, 0) + int(rows.sum())
    finally:
        model.train(was_training)
    if input_shape is None:
        raise ValueError("class_masks: data holds no samples")
    masks: dict[int, list[torch.Tensor]] = {}
    frequency: dict[int, list[torch.Tensor]] = {}
    for c in sorted(active):
        frequency[c] = [s.double().cpu() / counts[c] for s in active[c]]
        masks[c] = []
        for f in frequency[c]:
            mask = f >= tau
            keep = max(1, math.ceil(min_keep * f.numel()))
            if int(mask.sum()) < keep:
                order = torch.sort(-f, stable=True).indices[:keep]
                mask[order] = True
            masks[c].append(mask)
    return ClassMasks(layers, masks, frequency, counts, input_shape, float(tau), float(min_keep))


_SLICED = (nn.Conv2d, nn.Linear)
_CHANNELWISE = (nn.BatchNorm1d, nn.BatchNorm2d)
_PASSIVE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity)
_SUPPORTED = ("nn.Sequential of Conv2d, Linear, BatchNorm, ReLU, pooling, Flatten, Dropout and "
              "llkern.models.moda_cnn.ResidualReLUBlock")


class ChannelMap(nn.Module):
    """An extracted identity shortcut: ``y[:, dst[k]] = x[:, src[k]]``, the other ``out_channels`` channels 0.

    The input holds the block's kept input units and the output its kept output units; ``src``/``dst`` are
    the positions of the units kept on both sides (the intersection), so the residual addition happens
    only there. No parameters (two index buffers).
    """

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, out_channels: int) -> None:
        super().__init__()
        if src.shape != dst.shape or src.dim() != 1:
            raise ValueError(f"ChannelMap: expected src and dst of the same 1-d shape, got {list(src.shape)} "
                             f"and {list(dst.shape)}")
        self.out_channels = int(out_channels)
        self.register_buffer("src", src.long().clone())
        self.register_buffer("dst", dst.long().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((x.shape[0], self.out_channels, *x.shape[2:]))
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def extra_repr(self) -> str:
        return f"{len(self.src)} of {self.out_channels} channels"


def _check_leaf(prefix: str, m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        raise NotImplementedError(f"extract: cannot slice grouped convolution {prefix!r} (groups={m.groups})")
    if isinstance(m, nn.Flatten) and m.start_dim != 1:
        raise NotImplementedError(f"extract: cannot slice Flatten {prefix!r} with start_dim={m.start_dim}")
    if isinstance(m, (*_SLICED, *_CHANNELWISE, *_PASSIVE, nn.Flatten)):
        return
    residual = " (a residual block of a type extract does not know: it supports ResidualReLUBlock, whose " \
        "ReLU after the addition is a module)" if hasattr(m, "forward_residual") or hasattr(m, "shortcut") else ""
    raise NotImplementedError(f"extract: cannot slice {type(m).__name__} at {prefix!r}{residual}; supported: "
                              f"{_SUPPORTED}")


def _items(prefix: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units of a (nested) ``nn.Sequential`` in forward order: layers and (unexpanded) residual blocks."""
    if isinstance(m, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in m.named_children():
            out += _items(f"{prefix}.{name}" if prefix else name, child)
        return out
    if isinstance(m, ResidualReLUBlock):
        return [(prefix, m)]
    _check_leaf(prefix, m)
    return [(prefix, m)]


def _block_parts(name: str, block: ResidualReLUBlock
                 ) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]] | None]:
    """A residual block's branch layers and shortcut layers (None: an identity shortcut), checked."""
    branch = _items(f"{name}.branch", block.branch)
    shortcut = None if isinstance(block.shortcut, nn.Identity) else _items(f"{name}.shortcut", block.shortcut)
    for part, layers in (("branch", branch), ("shortcut", shortcut or [])):
        for layer_name, m in layers:
            if isinstance(m, (ResidualReLUBlock, nn.Flatten)) or (part == "shortcut" and isinstance(m, nn.ReLU)):
                raise NotImplementedError(f"extract: cannot slice {type(m).__name__} {layer_name!r} inside the "
                                          f"{part} of residual block {name!r}")
        producers = [i for i, (_, m) in enumerate(layers) if isinstance(m, _SLICED)]
        if part == "branch" and not producers:
            raise NotImplementedError(f"extract: the branch of residual block {name!r} has no Conv2d or Linear")
        if producers and any(isinstance(m, nn.ReLU) for _, m in layers[producers[-1] + 1:]):
            raise NotImplementedError(f"extract: the {part} of residual block {name!r} ends in a ReLU; the sum's "
                                      "units must be those of the ReLU after the addition")
    return branch, shortcut


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers of a (nested) ``nn.Sequential`` network in forward order, residual blocks expanded
    (branch, shortcut, the ReLU after the addition); anything else is refused."""
    if not isinstance(model, nn.Sequential):
        raise NotImplementedError(f"extract: expected model to be an {_SUPPORTED} (possibly nested), got "
                                  f"{type(model).__name__}")
    out: list[tuple[str, nn.Module]] = []
    for name, m in _items("", model):
        if isinstance(m, ResidualReLUBlock):
            branch, shortcut = _block_parts(name, m)
            out += branch + (shortcut or []) + [(f"{name}.relu", m.relu)]
        else:
            out.append((name, m))
    return out


def _class_index(c: object) -> int | None:
    """``c`` as a Python int (ints, NumPy integers, integer 0-d tensors), or None."""
    if isinstance(c, bool) or (isinstance(c, torch.Tensor) and (c.dim() or c.dtype.is_floating_point)):
        return None
    try:
        return operator.index(c)
    except TypeError:
        return None


def _check_classes(name: str, classes: Iterable[int], masks: ClassMasks) -> list[int]:
    if not isinstance(masks, ClassMasks):
        raise TypeError(f"{name}: expected masks to be llkern.moda.ClassMasks (from class_masks), got "
                        f"{type(masks).__name__}")
    single = _class_index(classes)
    if single is not None:
        classes = [single]
    elif isinstance(classes, torch.Tensor):
        classes = classes.tolist() if classes.dim() == 1 and not classes.dtype.is_floating_point else [classes]
    elif isinstance(classes, Iterable):
        classes = list(classes)
    else:
        raise TypeError(f"{name}: expected classes to be a class or an iterable of classes, got {classes!r}")
    if not classes:
        raise ValueError(f"{name}: expected classes to name at least one class, got an empty set")
    for i, c in enumerate(classes):
        index = _class_index(c)
        if index is None or index not in masks.masks:
            raise ValueError(f"{name}: unknown class {c!r} in classes; the masks know {masks.classes}")
        classes[i] = index
    if len(set(classes)) != len(classes):
        raise ValueError(f"{name}: expected distinct classes, got {classes}")
    return classes


@torch.no_grad()
def _probe(model: nn.Module, leaves: list[tuple[str, nn.Module]], masks: ClassMasks) -> dict[str, int]:
    """One forward of a zero sample: the spatial size (H·W) of each Flatten's input; checks that the model's
    ReLU layers are the masks' (names, call order and unit counts)."""
    sizes: dict[str, int] = {}
    units: list[tuple[str, int]] = []
    handles = [m.register_forward_hook(lambda _m, inp, _out, name=name: sizes.__setitem__(
        name, int(inp[0][0, 0].numel()) if inp[0].dim() > 2 else 1))
        for name, m in leaves if isinstance(m, nn.Flatten)]
    handles += [m.register_forward_hook(lambda _m, _inp, out, name=name: units.append(
        (name, int(out.shape[1]) if out.dim() >= 2 else 0))) for name, m in relu_modules(model)]
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros((1, *masks.input_shape), dtype=p.dtype, device=p.device))
    except RuntimeError as error:
        raise ValueError(f"extract: model does not run on a sample of the masks' input shape "
                         f"{list(masks.input_shape)} ({error}); compute the masks on this model") from error
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    expected = [(name, m.numel()) for name, m in zip(masks.layers, masks.masks[masks.classes[0]], strict=True)]
    if units != expected:  # (masks of another model of the same layout sliced it silently)
        raise ValueError(f"extract: the masks' ReLU layers (name, units) are {expected}, the model's {units}; "
                         "compute the masks on this model")
    return sizes


_Keep = torch.Tensor | None  # kept unit indices of a tensor (None: all)


@dataclass
class _Plan:
    """Per sliced layer the kept input and output indices; per identity shortcut ``(src, dst, n_out)``."""

    layers: dict[str, tuple[_Keep, _Keep]] = field(default_factory=dict)
    shortcuts: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)


def _plan(model: nn.Module, classes: list[int], masks: ClassMasks, keep_all_outputs: bool
          ) -> tuple[list[tuple[str, nn.Module]], _Plan]:
    """For each sliced layer, the kept input and output indices (None: all); see :func:`extract`."""
    leaves = _leaves(model)
    union = masks.union(classes)
    units = {name: u.nonzero().flatten() for name, u in zip(masks.layers, union, strict=True)}
    sizes = {name: u.numel() for name, u in zip(masks.layers, union, strict=True)}
    relu_names = {name for name, m in leaves if isinstance(m, nn.ReLU)}
    if relu_names != set(masks.layers):
        raise ValueError(f"extract: the masks' ReLU layers {masks.layers} are not the model's "
                         f"{sorted(relu_names)}; compute the masks on this model")
    spatial = _probe(model, leaves, masks)
    top = _items("", model)
    kinds = [isinstance(m, _SLICED) for _, m in top if isinstance(m, (*_SLICED, ResidualReLUBlock))]
    if not kinds or not kinds[-1]:
        where = " after its last residual block (the last layer, whose rows are the classes, must be one)" \
            if kinds else ""
        raise ValueError(f"extract: model has no Conv2d or Linear layer{where}")
    plan = _Plan()

    def run(items: list[tuple[str, nn.Module]], current: _Keep, end: _Keep, is_top: bool) -> _Keep:
        """Plan ``items`` reading a tensor whose kept units are ``current``; the last Conv2d/Linear writes
        ``end`` (at the top: the classes' rows). Returns the kept units of the output."""
        producers = [i for i, (_, m) in enumerate(items) if isinstance(m, _SLICED)]
        for i, (name, m) in enumerate(items):
            if isinstance(m, ResidualReLUBlock):
                branch, shortcut = _block_parts(name, m)
                out = units[f"{name}.relu"]
                run(branch, current, out, False)
                if shortcut is not None:
                    run(shortcut, current, out, False)
                else:  # identity: the input units that are also output units are added, at their positions
                    inp = torch.arange(sizes[f"{name}.relu"]) if current is None else current
                    if not torch.equal(inp, out):
                        both = torch.isin(out, inp)
                        plan.shortcuts[name] = (torch.searchsorted(inp, out[both]), both.nonzero().flatten(),
                                                len(out))
                current = out
            elif isinstance(m, _SLICED):
                out_keep: _Keep = None
                flatten: str | None = None  # a Flatten between this layer and its ReLU
                for later_name, later in items[i + 1:]:
                    if isinstance(later, (*_SLICED, ResidualReLUBlock)):
                        break
                    if isinstance(later, nn.Flatten):
                        flatten = later_name
                    if isinstance(later, nn.ReLU):
                        if flatten is not None:
                            raise NotImplementedError(
                                f"extract: {flatten!r} (Flatten) comes between {name!r} and the ReLU after it: that "
                                f"ReLU's units are flattened features, not {name!r}'s outputs; put the ReLU before "
                                "the Flatten")
                        out_keep = units[_name_of(items, later)]
                        break
                if i == producers[-1]:
                    if not is_top:
                        out_keep = end
                    elif not keep_all_outputs:
                        n_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                        bad = [c for c in classes if c >= n_out]
                        if bad:
                            raise ValueError(f"extract: classes {bad} are beyond the {n_out} outputs of the last "
                                             f"layer {name!r}")
                        out_keep = end
                plan.layers[name] = (current, out_keep)
                current = out_keep
            elif isinstance(m, nn.ReLU):
                # A ReLU whose units are not a sliced layer's outputs (the model's input, a second ReLU, a ReLU
                # after the last layer): the module computes the units in `current`, so its mask must keep them.
                kept = torch.arange(sizes[name]) if current is None else current
                dropped = kept[~torch.isin(kept, units[name])]
                if len(dropped):
                    raise NotImplementedError(
                        f"extract: ReLU {name!r} drops units {dropped.tolist()[:8]} that the layers before it keep "
                        "(it is not right after a Conv2d/Linear and its BatchNorm, or it follows the last layer); "
                        "the module would not compute the full model's logits with those units set to 0")
            elif isinstance(m, _CHANNELWISE):
                plan.layers[name] = (current, current)
            elif isinstance(m, nn.Flatten) and current is not None:
                s = spatial[name]
                current = (current[:, None] * s + torch.arange(s)).flatten()
        return current

    run(top, None, torch.tensor(classes, dtype=torch.long), True)
    return leaves, plan


def _name_of(leaves: list[tuple[str, nn.Module]], module: nn.Module) -> str:
    for name, m in leaves:
        if m is module:
            return name
    raise KeyError(module)  # pragma: no cover - the module comes from leaves


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, idx.to(t.device))


def _sliced(m: nn.Module, keep_in: torch.Tensor | None, keep_out: torch.Tensor | None) -> nn.Module:
    if isinstance(m, _CHANNELWISE):
        n = m.num_features if keep_in is None else len(keep_in)
        new = type(m)(n, eps=m.eps, momentum=m.momentum, affine=m.affine,
                      track_running_stats=m.track_running_stats)
        new = new.to(device=m.weight.device if m.affine else None)
        with torch.no_grad():
            if m.affine:
                new.weight = nn.Parameter(_take(m.weight, 0, keep_in).clone())
                new.bias = nn.Parameter(_take(m.bias, 0, keep_in).clone())
            if m.track_running_stats:
                new.running_mean = _take(m.running_mean, 0, keep_in).clone()
                new.running_var = _take(m.running_var, 0, keep_in).clone()
                new.num_batches_tracked = m.num_batches_tracked.clone()
        new.train(m.training)
        return new
    weight = _take(_take(m.weight, 0, keep_out), 1, keep_in)
    if isinstance(m, nn.Conv2d):
        new = nn.Conv2d(weight.shape[1], weight.shape[0], m.kernel_size, m.stride, m.padding, m.dilation,
                        bias=m.bias is not None, padding_mode=m.padding_mode)
    else:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=m.bias is not None)
    new.weight = nn.Parameter(weight.detach().clone())
    if m.bias is not None:
        new.bias = nn.Parameter(_take(m.bias, 0, keep_out).detach().clone())
    new.train(m.training)
    return new


def extract(model: nn.Module, classes: int | Iterable[int], masks: ClassMasks, *,
            keep_all_outputs: bool = False) -> nn.Module:
    """The module of ``classes``: a physically smaller copy of ``model`` (no fine-tuning).

    Keeps, at every ReLU layer, the union of the classes' unit masks: the Conv2d/Linear producing a
    layer keeps those output rows, the next one those input columns (a Flatten expands a channel to its
    H·W features), BatchNorm layers keep those channels. The last Conv2d/Linear keeps the rows of
    ``classes``, in the order given (``keep_all_outputs=True``: all rows), so the module's logit j is
    the full model's logit ``classes[j]`` computed with the dropped units set to 0 — every ``nn.ReLU``
    output multiplied by its union mask — exactly so when every BatchNorm comes before its ReLU (rounding
    aside). ``model`` is not changed; the result is a deep copy with the attribute ``moda_classes``.

    **Residual blocks** (:class:`llkern.models.moda_cnn.ResidualReLUBlock`, ``y = relu(branch(x) +
    shortcut(x))``). The stream between blocks is the output of each block's ReLU after the addition, so
    it has a mask like any ReLU layer: block k reads the units ``M_in`` (the previous ReLU's union mask)
    and writes ``M_out`` (its own after-addition ReLU's). The branch is sliced as a Sequential whose last
    Conv2d/BN write ``M_out``; a projection shortcut (1×1 conv, BN) reads ``M_in`` and writes ``M_out``.
    An identity shortcut becomes a :class:`ChannelMap`: the addition ``r[c] + x[c]`` is done on the
    intersection ``M_out ∩ M_in`` (the units both summands keep); on ``M_out \\ M_in`` the sum is ``r[c]``
    alone, because ``x[c]`` is a dropped unit, 0 in the zeroed model; units outside ``M_out`` are not
    computed, because the ReLU's output there is dropped. This is how we read MODA's "intersection of
    masks" for skips: the addition is restricted to the channels kept on both sides, while every layer
    keeps the union of the classes' masks. It keeps the exactness above: the module equals the full model
    with the dropped units zeroed. (Shrinking the stream to the intersection of the masks of all the
    layers that share it would drop units some class's mask keeps, and the logits would no longer be
    those of the zeroed model.)

    Supported: ``nn.Sequential`` networks (nested ones too) of Conv2d (groups=1), Linear, BatchNorm1d/2d,
    ReLU, pooling, Flatten, Dropout, Identity and ``ResidualReLUBlock``; other modules (other residual
    blocks included) raise ``NotImplementedError`` naming them.
    """
    classes = _check_classes("extract", classes, masks)
    leaves, plan = _plan(model, classes, masks, keep_all_outputs)
    # A MODALocalLoss's recording hooks are not the module's: the copy shares the loss (no deep copy of it and of
    # the graphs of what it recorded, which cannot be copied) and then drops its hooks.
    losses = {id(hook.__self__): hook.__self__ for m in model.modules()
              for hooks in (m._forward_hooks, m._forward_pre_hooks) for hook in hooks.values()
              if isinstance(getattr(hook, "__self__", None), MODALocalLoss)}
    small = copy.deepcopy(model, memo=dict(losses))
    for m in small.modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(getattr(hook, "__self__", None), MODALocalLoss):
                    del hooks[key]
    for name, m in leaves:
        if name not in plan.layers:
            continue
        keep_in, keep_out = plan.layers[name]
        parent_name, _, attr = name.rpartition(".")
        parent = small.get_submodule(parent_name)
        setattr(parent, attr, _sliced(m, keep_in, keep_out))
    for name, (src, dst, n_out) in plan.shortcuts.items():
        block = small.get_submodule(name)
        device = next(block.parameters()).device
        block.shortcut = ChannelMap(src, dst, n_out).to(device)
    small.moda_classes = tuple(classes)
    return small


def weight_masks(model: nn.Module, classes: int | Iterable[int], masks: ClassMasks, *,
                 keep_all_outputs: bool = False) -> dict[str, torch.Tensor]:
    """The entries of ``model``'s parameters that :func:`extract` keeps, as boolean tensors of the
    parameters' shapes keyed by parameter name (parameters it keeps whole are all True)."""
    classes = _check_classes("weight_masks", classes, masks)
    leaves, plan = _plan(model, classes, masks, keep_all_outputs)
    out: dict[str, torch.Tensor] = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    for name, m in leaves:
        if name not in plan.layers:
            continue
        keep_in, keep_out = plan.layers[name]
        prefix = f"{name}." if name else ""
        if isinstance(m, _CHANNELWISE):
            if m.affine and keep_in is not None:
                for p in ("weight", "bias"):
                    mask = torch.zeros(m.num_features, dtype=torch.bool)
                    mask[keep_in] = True
                    out[prefix + p] = mask
            continue
        rows = torch.zeros(m.weight.shape[0], dtype=torch.bool)
        rows[slice(None) if keep_out is None else keep_out] = True
        cols = torch.zeros(m.weight.shape[1], dtype=torch.bool)
        cols[slice(None) if keep_in is None else keep_in] = True
        grid = rows[:, None] & cols[None, :]
        out[prefix + "weight"] = grid.reshape(*grid.shape, *([1] * (m.weight.dim() - 2))).expand(m.weight.shape)
        if m.bias is not None:
            out[prefix + "bias"] = rows
    return out


def count_weights(module: nn.Module) -> int:
    """The number of parameter entries of ``module`` (weights, biases, BatchNorm's affine terms)."""
    return sum(p.numel() for p in module.parameters())


def _jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, int]:
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter, union
