"""MODA (Ngo et al., arXiv 2411.01074): activation-driven modular training and module extraction.

**Losses.** At every ReLU output of the network, each sample's unit activations ``a_i`` ((B, N_l):
a linear layer's outputs, or a conv layer's per-channel mean ``|activation|`` over space) are
L2-normalised, ``â_i = a_i / max(‖a_i‖, eps)``, and compared, ``S_ij = â_i · â_j``. Over the pairs
``i < j`` of the batch::

    L_aff = 1 − mean_layers mean_{i<j, y_i=y_j} S_ij      (intra-class affinity)
    L_dis =     mean_layers mean_{i<j, y_i≠y_j} S_ij      (inter-class dispersion)
    L_com =     mean_layers ‖a‖₁ / (B · N_l)              (compactness)
    total = CE + 1.0·L_aff + 1.0·L_dis + 0.3·L_com

A batch without a same-class pair gives ``L_aff = 0`` and one without a different-class pair
``L_dis = 0`` (a batch of one sample has neither): the term is 0 with a zero gradient, never NaN.
The pair sets are masks over the B×B similarity matrix (upper triangle), so nothing loops over pairs.

**Collecting the ReLU outputs.** :class:`ActivationCollector` registers forward hooks on every
``nn.ReLU`` module of a model (``inplace=True`` too: the hook sees the output) and removes them on
exit. Functional ReLUs (``F.relu``, ``torch.relu``) do not pass through a module and are not seen;
wrap such an output in :func:`record` (``x = record(F.relu(x))``), which hands it to the innermost
active collector and returns it unchanged.

**Extraction.** :func:`class_masks` marks, for every class c and ReLU layer, the units active
(``a > 0``) on at least ``tau`` of class c's samples (and at least ``min_keep`` of the layer, the most
often active). :func:`extract` builds the module of a set of classes: the union of their masks, the
network deep-copied with its Conv2d, Linear and BatchNorm layers sliced to the kept units, and the last
layer's rows restricted to the classes. In a residual block (``ResidualReLUBlock``) an identity shortcut's
addition is done on the intersection of the input's and the output's kept units (:func:`extract`).
:func:`modularity_report` measures modules' sizes, accuracies and overlap.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llkern.models.moda_cnn import ResidualReLUBlock
from llkern.nn.losses import CrossEntropy, LocalContext, LocalLoss, LocalLossOutput

__all__ = [
    "ActivationCollector",
    "ChannelMap",
    "ClassMasks",
    "MODALocalLoss",
    "MODALoss",
    "MODAOutput",
    "MODAReport",
    "ModuleStats",
    "affinity_loss",
    "class_masks",
    "compactness_loss",
    "count_weights",
    "dispersion_loss",
    "extract",
    "moda_local_losses",
    "moda_terms",
    "modularity_report",
    "record",
    "relu_modules",
    "unit_activations",
    "weight_masks",
]

DEFAULT_WEIGHTS = {"affinity": 1.0, "dispersion": 1.0, "compactness": 0.3}

# --- collecting ReLU outputs --------------------------------------------------------------------------------

_ACTIVE: list[ActivationCollector] = []


def record(x: torch.Tensor, name: str = "record") -> torch.Tensor:
    """Hand ``x`` (a functional ReLU's output) to the innermost active :class:`ActivationCollector`;
    returns ``x`` unchanged (and does nothing when no collector is active)."""
    if _ACTIVE:
        _ACTIVE[-1]._append(name, x)
    return x


def relu_modules(model: nn.Module) -> list[tuple[str, nn.ReLU]]:
    """The ``nn.ReLU`` modules of ``model`` with their qualified names, in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ReLU)]


class ActivationCollector:
    """Context manager that records every ``nn.ReLU`` output of ``model`` (and :func:`record` calls).

    ``with ActivationCollector(model) as acts: model(x)`` leaves the outputs, with their graphs, in
    ``acts.activations`` (one entry per ReLU call, in call order) and the ReLUs' names in ``acts.names``;
    the hooks are removed on exit. An ``nn.ReLU(inplace=True)`` output is the tensor the ReLU wrote:
    it must not be modified in place afterwards if a loss is to be computed on it.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ActivationCollector: expected model to be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.activations: list[torch.Tensor] = []
        self.names: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _append(self, name: str, output: torch.Tensor) -> None:
        self.names.append(name)
        self.activations.append(output)

    def clear(self) -> None:
        self.activations, self.names = [], []

    def __enter__(self) -> ActivationCollector:
        if self._handles:
            raise RuntimeError("ActivationCollector: already active (collectors are not re-entrant)")
        for name, m in relu_modules(self.model):
            self._handles.append(m.register_forward_hook(
                lambda _m, _inp, out, name=name: self._append(name, out)))
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _ACTIVE.remove(self)


# --- the losses ------------------------------------------------------------------------------------------


def unit_activations(t: torch.Tensor) -> torch.Tensor:
    """Per-sample unit activations ``(B, N)``: ``|t|`` for ``(B, N)``, the per-channel mean of ``|t|`` over
    the trailing (spatial) dimensions for ``(B, C, ...)``. 16-bit inputs are widened to float32."""
    if t.dim() < 2:
        raise ValueError(f"unit_activations: expected activations of shape (B, N) or (B, C, ...), "
                         f"got {list(t.shape)}")
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.abs() if t.dim() == 2 else t.abs().flatten(2).mean(dim=2)


def _pair_masks(target: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"MODA: expected target of shape [{batch}] (one label per sample), "
                         f"got {list(target.shape)}")
    upper = torch.ones(batch, batch, dtype=torch.bool, device=target.device).triu(1)
    same = target[:, None] == target[None, :]
    return same & upper, ~same & upper


def _as_list(activations: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    acts = [activations] if isinstance(activations, torch.Tensor) else list(activations)
    if not acts:
        raise ValueError("MODA: expected at least one layer of activations, got none")
    batch = acts[0].shape[0]
    for i, a in enumerate(acts):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"MODA: expected activations[{i}] to be a Tensor, got {type(a).__name__}")
        if not a.is_floating_point():  # (integer activations once reached vector_norm's dtype error)
            raise TypeError(f"MODA: expected floating-point activations, got activations[{i}] of dtype {a.dtype}")
        if a.dim() < 2 or a.shape[0] != batch:
            raise ValueError(f"MODA: expected activations[{i}] of shape (B={batch}, ...), got {list(a.shape)}")
    return acts


def moda_terms(activations: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
               eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """MODA's three terms on a list of layers' ReLU outputs (each ``(B, N)`` or ``(B, C, H, W)``).

    Returns ``{"affinity": L_aff, "dispersion": L_dis, "compactness": L_com}`` (0-d tensors with
    gradients): see the module docstring for the formulas. Without a same-class (different-class)
    pair in the batch, ``L_aff`` (``L_dis``) is 0.
    """
    acts = _as_list(activations)
    same, diff = _pair_masks(target, acts[0].shape[0])
    n_same, n_diff = same.sum(), diff.sum()
    aff, dis, com = [], [], []
    for t in acts:
        a = unit_activations(t)
        a_hat = a / a.norm(dim=1, keepdim=True).clamp_min(eps)
        s = a_hat @ a_hat.T
        aff.append((s * same).sum() / n_same.clamp_min(1))
        dis.append((s * diff).sum() / n_diff.clamp_min(1))
        com.append(a.sum() / a.numel())  # a ≥ 0, so the sum is ‖a‖₁
    mean_aff = torch.stack(aff).mean()
    zero = mean_aff.new_zeros(())
    return {"affinity": torch.where(n_same > 0, 1.0 - mean_aff, zero),
            "dispersion": torch.where(n_diff > 0, torch.stack(dis).mean(), zero),
            "compactness": torch.stack(com).mean()}


def affinity_loss(activations: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                  eps: float = 1e-8) -> torch.Tensor:
    """Intra-class affinity ``1 − mean_layers mean_{i<j, y_i=y_j} S_ij`` (0 without a same-class pair)."""
    return moda_terms(activations, target, eps)["affinity"]


def dispersion_loss(activations: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                    eps: float = 1e-8) -> torch.Tensor:
    """Inter-class dispersion ``mean_layers mean_{i<j, y_i≠y_j} S_ij`` (0 without a different-class pair)."""
    return moda_terms(activations, target, eps)["dispersion"]


def compactness_loss(activations: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Compactness ``mean_layers ‖a‖₁ / (B · N_l)``."""
    acts = _as_list(activations)
    return torch.stack([(a := unit_activations(t)).abs().sum() / a.numel() for t in acts]).mean()


def _check_weights(name: str, affinity: float, dispersion: float, compactness: float) -> dict[str, float]:
    weights = {"affinity": affinity, "dispersion": dispersion, "compactness": compactness}
    for arg, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name}: expected {arg} to be a finite number >= 0, got {value!r}")
    return {k: float(v) for k, v in weights.items()}


def _weighted(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    return sum(weights[k] * terms[k] for k in ("affinity", "dispersion", "compactness"))


@dataclass
class MODAOutput:
    """What :class:`MODALoss` returns: the total loss, the logits and the (detached) terms."""

    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class MODALoss(nn.Module):
    """End-to-end MODA training of ``model``: ``CE(model(x), y) + w_aff·L_aff + w_dis·L_dis + w_com·L_com``
    on the outputs of all of ``model``'s ``nn.ReLU`` modules (and :func:`record` calls).

    ``MODALoss(model)(x, y)`` returns a :class:`MODAOutput` whose terms are ``"ce"``, ``"affinity"``,
    ``"dispersion"`` and ``"compactness"``; the hooks exist only during the call. ``model`` is a
    submodule (its parameters are this module's).
    """

    def __init__(self, model: nn.Module, affinity: float = 1.0, dispersion: float = 1.0, compactness: float = 0.3,
                 label_smoothing: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MODALoss: expected model to be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.weights = _check_weights("MODALoss", affinity, dispersion, compactness)
        self.label_smoothing, self.eps = label_smoothing, eps

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> MODAOutput:
        with ActivationCollector(self.model) as collected:
            logits = self.model(x)
        if not collected.activations:
            raise ValueError(f"MODALoss: model ({type(self.model).__name__}) produced no ReLU output: it needs "
                             "nn.ReLU modules, or functional ReLUs wrapped in llkern.moda.core.record")
        terms = moda_terms(collected.activations, target, self.eps)
        ce = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        loss = ce + _weighted(terms, self.weights)
        return MODAOutput(loss, logits, {"ce": ce.detach(), **{k: v.detach() for k, v in terms.items()}})


class MODALocalLoss(LocalLoss):
    """MODA as the local loss of one module of a :class:`llkern.LocalNet`: cross-entropy through the
    module's head plus the weighted MODA terms on the ``nn.ReLU`` outputs inside ``block``.

    The loss is built for its block: it keeps forward hooks on the block's ReLUs, which record their
    outputs while the block runs in training mode with gradients enabled, and consumes them when
    called (``LocalNet.local_step`` runs the module, then its loss). Use :func:`moda_local_losses` to
    make one per module. A training-mode forward of the block with gradients *outside*
    ``local_step`` leaves outputs that the next call would also count: call :meth:`clear` after one.
    Terms: ``"ce"`` (or the task's), ``"affinity"``, ``"dispersion"``, ``"compactness"``.

    Args:
        block: the module of the LocalNet whose ReLUs are used.
        affinity, dispersion, compactness: the terms' weights (MODA's 1.0, 1.0, 0.3).
        task: the task loss through the head (default :class:`llkern.nn.losses.CrossEntropy`).
    """

    def __init__(self, block: nn.Module, affinity: float = 1.0, dispersion: float = 1.0, compactness: float = 0.3,
                 task: LocalLoss | None = None, eps: float = 1e-8) -> None:
        super().__init__()
        if not isinstance(block, nn.Module):
            raise TypeError(f"MODALocalLoss: expected block to be an nn.Module, got {type(block).__name__}")
        relus = relu_modules(block)
        if not relus:
            raise ValueError(f"MODALocalLoss: block ({type(block).__name__}) has no nn.ReLU module")
        if task is not None and not isinstance(task, LocalLoss):
            raise TypeError(f"MODALocalLoss: expected task to be an llkern.LocalLoss, got {type(task).__name__}")
        self.task = task if task is not None else CrossEntropy()
        self.weights = _check_weights("MODALocalLoss", affinity, dispersion, compactness)
        self.eps = eps
        self._recorded: list[torch.Tensor] = []
        # Not registered as submodules: the block belongs to the LocalNet, not to its loss.
        self._handles = [m.register_forward_hook(self._hook) for _, m in relus]

    def _hook(self, module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            self._recorded.append(output)

    def clear(self) -> None:
        """Forget the recorded ReLU outputs."""
        self._recorded = []

    def remove(self) -> None:
        """Remove the hooks from the block (the loss is unusable afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def forward(self, ctx: LocalContext) -> LocalLossOutput:
        acts, self._recorded = self._recorded, []
        batch = ctx.target.shape[0]
        acts = [a for a in acts if a.shape[0] == batch]
        if not acts:
            raise RuntimeError(f"MODALocalLoss: no ReLU output of module {ctx.k} was recorded; build the loss "
                               "with the block it trains (llkern.moda.core.moda_local_losses(blocks)) and run the "
                               "module in training mode with gradients")
        out = self.task(ctx)
        terms = moda_terms(acts, ctx.target, self.eps)
        loss = out.loss + _weighted(terms, self.weights).to(out.loss.dtype)
        named = dict(out.terms)
        named.update({k: v.detach() for k, v in terms.items()})
        return LocalLossOutput(loss, out.logits, named, correct=out.correct, counted=out.counted)


def moda_local_losses(blocks: Sequence[nn.Module], **kwargs: float) -> list[MODALocalLoss]:
    """One :class:`MODALocalLoss` per block, for ``LocalNet(blocks, losses=moda_local_losses(blocks))``."""
    return [MODALocalLoss(block, **kwargs) for block in blocks]


# --- extraction ------------------------------------------------------------------------------------------


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


def _batches(data: object, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
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
        for x, y in _batches(data, batch_size):
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


def _check_classes(name: str, classes: Iterable[int], masks: ClassMasks) -> list[int]:
    if isinstance(classes, int):
        classes = [classes]
    classes = list(classes)
    if not classes:
        raise ValueError(f"{name}: expected classes to name at least one class, got an empty set")
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, int) or c not in masks.masks:
            raise ValueError(f"{name}: unknown class {c!r} in classes; the masks know {masks.classes}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"{name}: expected distinct classes, got {classes}")
    return classes


@torch.no_grad()
def _flatten_spatial(model: nn.Module, leaves: list[tuple[str, nn.Module]], input_shape: tuple[int, ...]
                     ) -> dict[str, int]:
    """Spatial size (H·W) of each Flatten's input, from one forward of a zero sample."""
    sizes: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda _m, inp, _out, name=name: sizes.__setitem__(
        name, int(inp[0][0, 0].numel()) if inp[0].dim() > 2 else 1))
        for name, m in leaves if isinstance(m, nn.Flatten)]
    if not handles:
        return sizes
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros((1, *input_shape), dtype=p.dtype, device=p.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
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
    spatial = _flatten_spatial(model, leaves, masks.input_shape)
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
    small = copy.deepcopy(model)
    for m in small.modules():  # a MODALocalLoss's recording hooks (and a copy of the loss) are not the module's
        for key, hook in list(m._forward_hooks.items()):
            if isinstance(getattr(hook, "__self__", None), MODALocalLoss):
                del m._forward_hooks[key]
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


# --- evaluation ------------------------------------------------------------------------------------------


@dataclass
class ModuleStats:
    """One module's figures. Accuracies are on the test samples of its classes; ``*_restricted``: the
    prediction is the argmax over the module's classes only (the module's own logits; the full model's
    logits of those classes), ``*_all``: over all classes (the module then keeps every output row)."""

    classes: tuple[int, ...]
    weights: int
    fraction: float
    samples: int
    module_restricted: float
    full_restricted: float
    module_all: float
    full_all: float


@dataclass
class MODAReport:
    """What :func:`modularity_report` measured; ``to_markdown()`` renders it.

    Overlap between the single-class modules, over all pairs of them: ``overlap_jaccard`` is the mean
    Jaccard index ``|A∩B| / |A∪B|`` of the kept weight entries, ``overlap_shared`` the mean ``|A∩B|``
    as a fraction of the full model's weights.
    """

    full_weights: int
    full_accuracy: float
    composed_accuracy: float | None
    rows: list[ModuleStats]
    overlap_jaccard: float | None
    overlap_shared: float | None
    tau: float

    @property
    def singles(self) -> list[ModuleStats]:
        return [r for r in self.rows if len(r.classes) == 1]

    def to_markdown(self) -> str:
        lines = ["| classes | weights | % of full | test samples | module acc. (among its classes) | "
                 "full acc. (among its classes) | module acc. (10-way) | full acc. (10-way) |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {','.join(map(str, r.classes))} | {r.weights:,} | {100 * r.fraction:.1f} % | "
                         f"{r.samples} | {100 * r.module_restricted:.2f} % | {100 * r.full_restricted:.2f} % | "
                         f"{100 * r.module_all:.2f} % | {100 * r.full_all:.2f} % |")
        return "\n".join(lines)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([model(chunk) for chunk in x.split(batch_size)])


@torch.no_grad()
def modularity_report(model: nn.Module, masks: ClassMasks, class_sets: Sequence[int | Sequence[int]],
                      x_test: torch.Tensor, y_test: torch.Tensor) -> MODAReport:
    """Sizes, accuracies and overlap of the modules of ``class_sets`` (each a class or a tuple of classes).

    ``composed_accuracy``: every class's single-class module run on every test sample, the prediction
    the class whose module gives the largest logit (MODA's composition of modules), over the whole test
    set; compare with ``full_accuracy``. The overlap is over all classes' single-class modules.
    """
    was_training = model.training
    model.eval()
    try:
        full_weights = count_weights(model)
        full_logits = _logits(model, x_test)
        full_pred = full_logits.argmax(1)
        rows = []
        for spec in class_sets:
            classes = _check_classes("modularity_report", spec, masks)
            t = torch.tensor(classes, device=y_test.device)
            rows_idx = torch.isin(y_test, t)
            x, y = x_test[rows_idx], y_test[rows_idx]
            module = extract(model, classes, masks).eval()
            module_all = extract(model, classes, masks, keep_all_outputs=True).eval()
            pred_module = t[_logits(module, x).argmax(1)] if len(y) else y
            pred_full = t[full_logits[rows_idx][:, t].argmax(1)] if len(y) else y

            def acc(pred: torch.Tensor, y: torch.Tensor = y) -> float:
                return float((pred == y).float().mean()) if len(y) else float("nan")

            rows.append(ModuleStats(tuple(classes), count_weights(module), count_weights(module) / full_weights,
                                    len(y), acc(pred_module), acc(pred_full),
                                    acc(_logits(module_all, x).argmax(1) if len(y) else y), acc(full_pred[rows_idx])))
        singles = masks.classes
        composed = None
        if len(singles) > 1:
            scores = torch.stack([_logits(extract(model, c, masks).eval(), x_test)[:, 0] for c in singles], dim=1)
            composed = float((torch.tensor(singles, device=y_test.device)[scores.argmax(1)] == y_test).float().mean())
        wm = [weight_masks(model, c, masks) for c in singles]
        pairs = [(i, j) for i in range(len(wm)) for j in range(i + 1, len(wm))]
        jaccard = shared = None
        if pairs:
            stats = [_jaccard(wm[i], wm[j]) for i, j in pairs]
            jaccard = sum(inter / union for inter, union in stats) / len(stats)
            shared = sum(inter for inter, _ in stats) / len(stats) / full_weights
        return MODAReport(full_weights, float((full_pred == y_test).float().mean()), composed, rows, jaccard, shared,
                          masks.tau)
    finally:
        model.train(was_training)
