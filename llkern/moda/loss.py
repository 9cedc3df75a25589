"""MODA's losses (Ngo et al., arXiv 2411.01074): affinity, dispersion and compactness on every ReLU output.

See llkern/moda/__init__.py for the method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llkern.moda.activations import ActivationCollector, relu_modules, unit_activations
from llkern.nn.losses import CrossEntropy, LocalContext, LocalLoss, LocalLossOutput

DEFAULT_WEIGHTS = {"affinity": 1.0, "dispersion": 1.0, "compactness": 0.3}


def _pair_masks(target: torch.Tensor, batch: int, ignore_index: int | None = -100
                ) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"MODA: expected target to be a Tensor, got {type(target).__name__}")
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"MODA: expected target of shape [{batch}] (one label per sample), "
                         f"got {list(target.shape)}")
    upper = torch.ones(batch, batch, dtype=torch.bool, device=target.device).triu(1)
    if ignore_index is not None:  # unlabelled samples are in no pair (as the cross-entropy skips them)
        labelled = target != ignore_index
        upper &= labelled[:, None] & labelled[None, :]
    same = target[:, None] == target[None, :]
    return same & upper, ~same & upper


def _as_list(activations: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    acts = [activations] if isinstance(activations, torch.Tensor) else list(activations)
    if not acts:
        raise ValueError("MODA: expected at least one layer of activations, got none")
    for i, a in enumerate(acts):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"MODA: expected activations[{i}] to be a Tensor, got {type(a).__name__}")
    batch = acts[0].shape[0] if acts[0].dim() else 0
    for i, a in enumerate(acts):
        if not a.is_floating_point():  # (integer activations once reached vector_norm's dtype error)
            raise TypeError(f"MODA: expected floating-point activations, got activations[{i}] of dtype {a.dtype}")
        if a.dim() < 2 or a.shape[0] != batch:
            raise ValueError(f"MODA: expected activations[{i}] of shape (B={batch}, ...), got {list(a.shape)}")
    if batch == 0:  # (the compactness term was 0/0 = NaN)
        raise ValueError("MODA: expected a batch of at least one sample, got an empty batch "
                         f"(activations[0] of shape {list(acts[0].shape)})")
    return acts


def moda_terms(activations: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
               eps: float = 1e-8, ignore_index: int | None = -100) -> dict[str, torch.Tensor]:
    """MODA's three terms on a list of layers' ReLU outputs (each ``(B, N)`` or ``(B, C, H, W)``).

    Returns ``{"affinity": L_aff, "dispersion": L_dis, "compactness": L_com}`` (0-d tensors with
    gradients): see the module docstring for the formulas. Without a same-class (different-class)
    pair in the batch, ``L_aff`` (``L_dis``) is 0. Samples whose target is ``ignore_index`` (default
    -100, the cross-entropy's; None: none) are unlabelled: in no pair, but counted by ``L_com``.
    """
    acts = _as_list(activations)
    same, diff = _pair_masks(target, acts[0].shape[0], ignore_index)
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
                  eps: float = 1e-8, ignore_index: int | None = -100) -> torch.Tensor:
    """Intra-class affinity ``1 − mean_layers mean_{i<j, y_i=y_j} S_ij`` (0 without a same-class pair)."""
    return moda_terms(activations, target, eps, ignore_index)["affinity"]


def dispersion_loss(activations: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor,
                    eps: float = 1e-8, ignore_index: int | None = -100) -> torch.Tensor:
    """Inter-class dispersion ``mean_layers mean_{i<j, y_i≠y_j} S_ij`` (0 without a different-class pair)."""
    return moda_terms(activations, target, eps, ignore_index)["dispersion"]


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


def _refuse_recomputed(who: str, module: nn.Module) -> None:
    """MODA's terms need the ReLU outputs with their graphs from the forward; a recomputed segment runs its forward
    without gradients (its ReLUs would be left out, silently changing the loss) and builds the graph only in the
    backward."""
    from llkern.nn.recompute import RecomputedSequential

    found = [name or type(m).__name__ for name, m in module.named_modules()
             if isinstance(m, RecomputedSequential) and m.segments > 1]
    if found:
        raise ValueError(f"{who}: {found[0]} is a RecomputedSequential of several segments: its ReLU outputs exist "
                         "with their graphs only in the backward's recomputation, not when the MODA terms are formed; "
                         "use the plain module (recompute_segments(module, 1), or the nn.Sequential it was made from)")


class MODALoss(nn.Module):
    """End-to-end MODA training of ``model``: ``CE(model(x), y) + w_aff·L_aff + w_dis·L_dis + w_com·L_com``
    on the outputs of all of ``model``'s ``nn.ReLU`` modules (and :func:`record` calls).

    ``MODALoss(model)(x, y)`` returns a :class:`MODAOutput` whose terms are ``"ce"``, ``"affinity"``,
    ``"dispersion"`` and ``"compactness"``; the hooks exist only during the call. ``model`` is a
    submodule (its parameters are this module's). Samples labelled ``ignore_index`` (-100) are skipped
    by the cross-entropy and belong to no pair of the affinity and dispersion terms.
    """

    def __init__(self, model: nn.Module, affinity: float = 1.0, dispersion: float = 1.0, compactness: float = 0.3,
                 label_smoothing: float = 0.0, eps: float = 1e-8, ignore_index: int = -100) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"MODALoss: expected model to be an nn.Module, got {type(model).__name__}")
        _refuse_recomputed("MODALoss", model)
        self.model = model
        self.weights = _check_weights("MODALoss", affinity, dispersion, compactness)
        self.label_smoothing, self.eps, self.ignore_index = label_smoothing, eps, ignore_index

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> MODAOutput:
        with ActivationCollector(self.model) as collected:
            logits = self.model(x)
        if not collected.activations:
            raise ValueError(f"MODALoss: model ({type(self.model).__name__}) produced no ReLU output: it needs "
                             "nn.ReLU modules, or functional ReLUs wrapped in llkern.moda.record")
        terms = moda_terms(collected.activations, target, self.eps, self.ignore_index)
        ce = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing, ignore_index=self.ignore_index)
        loss = ce + _weighted(terms, self.weights)
        return MODAOutput(loss, logits, {"ce": ce.detach(), **{k: v.detach() for k, v in terms.items()}})


class MODALocalLoss(LocalLoss):
    """MODA as the local loss of one module of a :class:`llkern.LocalNet`: cross-entropy through the
    module's head plus the weighted MODA terms on the ``nn.ReLU`` outputs inside ``block``.

    The loss is built for its block: it keeps forward hooks on the block's ReLUs, which record their
    outputs while the block runs in training mode with gradients enabled, and consumes them when
    called (``LocalNet.local_step`` runs the module, then its loss). Use :func:`moda_local_losses` to
    make one per module. Every forward of the block (called, or run layer by layer as ``local_step``
    runs a Sequential) first drops what an earlier forward recorded and no loss call consumed, so the
    loss sees the ReLU outputs of the block's latest forward.
    Samples labelled with the task's ``ignore_index`` (-100) belong to no pair.
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
        _refuse_recomputed("MODALocalLoss", block)
        relus = relu_modules(block)
        if not relus:
            raise ValueError(f"MODALocalLoss: block ({type(block).__name__}) has no nn.ReLU module")
        if task is not None and not isinstance(task, LocalLoss):
            raise TypeError(f"MODALocalLoss: expected task to be an llkern.LocalLoss, got {type(task).__name__}")
        self.task = task if task is not None else CrossEntropy()
        self.weights = _check_weights("MODALocalLoss", affinity, dispersion, compactness)
        self.eps = eps
        self._recorded: list[torch.Tensor] = []
        # Not registered as submodules: the block belongs to the LocalNet, not to its loss. The pre-hooks forget
        # the outputs of a forward that no loss call consumed (they were counted by the next step, and held
        # their graphs until then). LocalNet.local_step runs a Sequential block child by child (no hook of the
        # block fires), a plain forward calls the block: hook both the block and the first layer it runs.
        first = block
        while isinstance(first, nn.Sequential) and len(first):
            first = first[0]
        starts = [block] if first is block else [block, first]
        self._handles = [*(m.register_forward_pre_hook(self._start) for m in starts),
                         *(m.register_forward_hook(self._hook) for _, m in relus)]

    def _start(self, _module: nn.Module, _inputs: object) -> None:
        self._recorded = []

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
        if not acts:
            raise RuntimeError(f"MODALocalLoss: no ReLU output of module {ctx.k} was recorded; build the loss "
                               "with the block it trains (llkern.moda.moda_local_losses(blocks)) and run the "
                               "module in training mode with gradients")
        out = self.task(ctx)
        terms = moda_terms(acts, ctx.target, self.eps, getattr(self.task, "ignore_index", -100))
        loss = out.loss + _weighted(terms, self.weights).to(out.loss.dtype)
        named = dict(out.terms)
        named.update({k: v.detach() for k, v in terms.items()})
        return LocalLossOutput(loss, out.logits, named, correct=out.correct, counted=out.counted)


def moda_local_losses(blocks: Sequence[nn.Module], **kwargs: float) -> list[MODALocalLoss]:
    """One :class:`MODALocalLoss` per block, for ``LocalNet(blocks, losses=moda_local_losses(blocks))``."""
    return [MODALocalLoss(block, **kwargs) for block in blocks]
