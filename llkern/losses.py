"""Local losses: what each module of a :class:`llkern.LocalNet` minimises.

A local loss is an ``nn.Module`` whose ``forward`` takes a :class:`LocalContext` (the
module's detached input, its output, its head, the targets, and the residual branches of
its blocks) and returns a :class:`LocalLossOutput`. Write a new objective by subclassing
:class:`LocalLoss`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llkern.heads import ProjectionHead
from llkern.ops.similarity import renyi_mutual_information, supcon_loss
from llkern.ops.transport import transport_penalty


@dataclass
class LocalContext:
    """Everything a local loss may use for module ``k`` (0-based) of ``num_modules``."""

    k: int
    num_modules: int
    inputs: torch.Tensor           # the module's input: detached, no gradient flows back
    outputs: torch.Tensor          # the module's output, with its graph
    target: torch.Tensor
    head: nn.Module
    residuals: list[torch.Tensor] = field(default_factory=list)  # r(x) of blocks with forward_residual


@dataclass
class LocalLossOutput:
    """A module's loss and named terms for logging; for its accuracy either the logits, or the
    number of correct predictions and of counted targets (what a fused head returns)."""

    loss: torch.Tensor
    logits: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    correct: torch.Tensor | None = None
    counted: torch.Tensor | None = None


class LocalLoss(nn.Module):
    """Base class of local losses: override ``forward(ctx) -> LocalLossOutput``."""

    def forward(self, ctx: LocalContext) -> LocalLossOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class CrossEntropy(LocalLoss):
    """Cross-entropy of the module's head on its output: ``CE(head(outputs), target)``.

    A head with a fused ``loss(features, target, ...)`` method (:class:`llkern.heads.LinearHead`)
    computes it without forming logits; any other head is called for logits.
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, ctx: LocalContext) -> LocalLossOutput:
        fused = getattr(ctx.head, "loss", None)
        if callable(fused):
            loss, correct = fused(ctx.outputs, ctx.target, label_smoothing=self.label_smoothing,
                                  ignore_index=self.ignore_index)
            counted = (ctx.target != self.ignore_index).sum()
            return LocalLossOutput(loss, None, {"ce": loss.detach()}, correct=correct, counted=counted)
        logits = ctx.head(ctx.outputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ctx.target.reshape(-1),
                               label_smoothing=self.label_smoothing, ignore_index=self.ignore_index)
        return LocalLossOutput(loss, logits, {"ce": loss.detach()})


TAU_SCHEDULES = ("constant", "varying")


def transport_tau(k: int, num_modules: int, tau: float, schedule: str = "constant") -> float:
    """τ of module ``k``: ``tau`` ("constant"), or ``tau/2`` on the first ⌊K/2⌋ modules ("varying", TRGL)."""
    if schedule not in TAU_SCHEDULES:
        raise ValueError(f"expected tau_schedule to be one of {TAU_SCHEDULES}, got {schedule!r}")
    if schedule == "varying" and k < num_modules // 2:
        return tau / 2.0
    return tau


class TransportRegularized(LocalLoss):
    """TRGL: a task loss plus the transport penalty ``(1/2τ_k)·mean(r²)``.

    Args:
        task: the task loss (default :class:`CrossEntropy`).
        tau: τ (TRGL used 1 for K = 4, 8, 16 and 100 for K = 2 on ResNet-110).
        tau_schedule: ``"constant"`` or ``"varying"`` (τ/2 on the first ⌊K/2⌋ modules).
        on: ``"blocks"`` sums the penalty over the residual branches of the module's blocks
            (blocks that define ``forward_residual(x) -> (y, r)``); ``"module"`` penalises
            ``y − x`` of the whole module (input and output must have the same shape).
        reduction: ``"mean"`` or ``"sum_per_sample"``, as in :func:`llkern.functional.transport_penalty`.
        impl: implementation switch of the op.
    """

    def __init__(self, task: LocalLoss | None = None, tau: float = 1.0, tau_schedule: str = "constant",
                 on: str = "blocks", reduction: str = "mean", impl: str = "auto") -> None:
        super().__init__()
        if on not in ("blocks", "module"):
            raise ValueError(f"TransportRegularized: expected on to be 'blocks' or 'module', got {on!r}")
        if not tau > 0:
            raise ValueError(f"TransportRegularized: expected tau > 0, got {tau!r}")
        transport_tau(0, 1, tau, tau_schedule)  # validates the schedule name
        self.task = task if task is not None else CrossEntropy()
        self.tau, self.tau_schedule, self.on, self.reduction, self.impl = tau, tau_schedule, on, reduction, impl
        self._warned_no_residual: set[int] = set()

    def forward(self, ctx: LocalContext) -> LocalLossOutput:
        out = self.task(ctx)
        tau = transport_tau(ctx.k, ctx.num_modules, self.tau, self.tau_schedule)
        if self.on == "module":
            if ctx.outputs.shape != ctx.inputs.shape:
                raise ValueError(
                    f"TransportRegularized(on='module'): module {ctx.k} changes the shape "
                    f"{list(ctx.inputs.shape)} -> {list(ctx.outputs.shape)}, so y - x is undefined; "
                    "use on='blocks' with blocks that define forward_residual")
            penalty = transport_penalty(ctx.outputs, ctx.inputs, tau, self.reduction, impl=self.impl)
        elif ctx.residuals:
            penalty = sum(transport_penalty(r, None, tau, self.reduction, impl=self.impl) for r in ctx.residuals)
        else:
            if ctx.k not in self._warned_no_residual:
                self._warned_no_residual.add(ctx.k)
                warnings.warn(f"TransportRegularized(on='blocks'): module {ctx.k} has no block defining "
                              "forward_residual(x) -> (y, r); its transport penalty is 0", stacklevel=2)
            penalty = out.loss.new_zeros(())
        terms = dict(out.terms)
        terms["transport"] = penalty.detach()
        return LocalLossOutput(out.loss + penalty.to(out.loss.dtype), out.logits, terms)


def _positive_number(name: str, arg: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {arg} to be a number, got {type(value).__name__}")
    if not (float(value) > 0.0 and math.isfinite(float(value))):
        raise ValueError(f"{name}: expected {arg} to be a finite number > 0, got {value!r}")
    return float(value)


class _LastModuleTask(LocalLoss):
    """A representation objective on modules 0..K−2 and, by default, a task loss on the last module.

    Subclasses implement :meth:`local` (the objective of a module that is not trained by the task loss).
    """

    def __init__(self, name: str, last_module_task: LocalLoss | bool) -> None:
        super().__init__()
        if last_module_task is True:
            last_module_task = CrossEntropy()
        elif last_module_task is False:
            last_module_task = None
        elif not isinstance(last_module_task, LocalLoss):
            raise TypeError(f"{name}: expected last_module_task to be True, False or a llkern.losses.LocalLoss, "
                            f"got {type(last_module_task).__name__}")
        self.name = name
        self.task = last_module_task

    def uses_task(self, k: int, num_modules: int) -> bool:
        """Whether module ``k`` of ``num_modules`` is trained by the task loss (the last one, by default)."""
        return self.task is not None and k == num_modules - 1

    def local(self, ctx: LocalContext) -> LocalLossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, ctx: LocalContext) -> LocalLossOutput:
        if self.uses_task(ctx.k, ctx.num_modules):
            if isinstance(self.task, CrossEntropy) and isinstance(ctx.head, ProjectionHead):
                raise ValueError(f"{self.name}: the last module (k={ctx.k}) is trained by cross-entropy but its "
                                 "head is a ProjectionHead; give it a classifier (e.g. llkern.heads."
                                 "contrastive_heads(num_classes, num_modules) with num_modules = K)")
            return self.task(ctx)
        return self.local(ctx)


class SupervisedContrastive(_LastModuleTask):
    """InfoPro's contrastive local objective: the supervised contrastive loss of the module's head
    projections, ``supcon_loss(head(outputs), target, temperature)``
    (:func:`llkern.ops.similarity.supcon_loss`, rows L2-normalised).

    The head of such a module should be a projection head (:class:`llkern.heads.ProjectionHead`:
    mean-pool + MLP); the loss has no logits, so ``StepResult.accuracies[k]`` is None. As in
    InfoPro, the last module is trained by a task loss instead (``last_module_task``, default
    :class:`CrossEntropy`) so the network ends in a classifier: use
    :func:`llkern.heads.contrastive_heads` for the heads. Terms: ``"supcon"``, or the task loss's
    (``"ce"``) on the last module.

    Args:
        temperature: τ > 0 (default 0.07, InfoPro's).
        normalize: L2-normalise the projections first (default True).
        last_module_task: ``True`` (default): :class:`CrossEntropy` on the last module; a
            :class:`LocalLoss`: that loss on the last module; ``False``: the contrastive loss on every
            module (then no head is trained as a classifier).
    """

    def __init__(self, temperature: float = 0.07, *, normalize: bool = True,
                 last_module_task: LocalLoss | bool = True) -> None:
        name = "SupervisedContrastive"
        super().__init__(name, last_module_task)
        self.temperature = _positive_number(name, "temperature", temperature)
        self.normalize = bool(normalize)

    def local(self, ctx: LocalContext) -> LocalLossOutput:
        z = ctx.head(ctx.outputs)
        target = ctx.target
        if z.dim() > 2:  # per-token projections (B,T,d): every token is a sample
            z, target = z.reshape(-1, z.shape[-1]), target.reshape(-1)
        loss = supcon_loss(z, target, self.temperature, normalize=self.normalize)
        return LocalLossOutput(loss, None, {"supcon": loss.detach()})


SIGMA_RULES = ("rms", "silverman")


class MutualInformation(_LastModuleTask):
    """MOLE's local objective: maximise the matrix-based Rényi-2 mutual information ``I(T; Y)``
    (bits) between the module's output T and the labels Y; the loss is ``−I``
    (:func:`llkern.ops.similarity.renyi_mutual_information`).

    T is the module's output itself, each sample's features flattened (``pool=False``, default,
    as MOLE: the whole representation), or mean-pooled over H, W (``pool=True``, (B,C,H,W) → (B,C):
    a C-dimensional summary, cheaper for wide maps). No head is used on these modules: LocalNet's
    default heads there stay untrained, only the last head is a classifier. As with
    :class:`SupervisedContrastive` the last module is trained by a task loss by default
    (``last_module_task``). Terms: ``"mi"`` (I in bits, positive), or ``"ce"`` on the last module.

    The Gaussian kernel width σ matters. Squared distances between d-dimensional rows grow like d,
    so a per-feature width (Silverman's rule, the op's default) makes the Gram matrix nearly the
    identity for wide features, and I then sits at its maximum H(Y) with no gradient; a fixed
    width lets the module raise I by scaling its output up. The default ``sigma="rms"`` sets
    ``σ = sigma_scale · d_rms``, with ``d_rms² = 2 Σ_j Var(T_j)`` the mean squared distance between
    two rows of the batch, and differentiates through it (T is divided by σ and the op called with
    width 1): the objective is then invariant to the scale of T.

    Args:
        sigma: ``"rms"`` (default; see above), ``"silverman"`` (Silverman's rule on the batch, not
            differentiated through) or a fixed width > 0.
        sigma_scale: the factor on ``d_rms`` for ``sigma="rms"`` (default 0.5).
        label_sigma: width of the labels' kernel; None (default) is the label-equality indicator.
        pool: mean-pool (B,C,H,W) features over H, W instead of flattening them (default False).
        last_module_task: as in :class:`SupervisedContrastive`.
    """

    def __init__(self, sigma: float | str = "rms", *, sigma_scale: float = 0.5, label_sigma: float | None = None,
                 pool: bool = False, last_module_task: LocalLoss | bool = True) -> None:
        name = "MutualInformation"
        super().__init__(name, last_module_task)
        if isinstance(sigma, str):
            if sigma not in SIGMA_RULES:
                raise ValueError(f"{name}: expected sigma to be one of {SIGMA_RULES} or a number > 0, got {sigma!r}")
        else:
            sigma = _positive_number(name, "sigma", sigma)
        self.sigma = sigma
        self.sigma_scale = _positive_number(name, "sigma_scale", sigma_scale)
        self.label_sigma = None if label_sigma is None else _positive_number(name, "label_sigma", label_sigma)
        self.pool = bool(pool)

    def representation(self, outputs: torch.Tensor) -> torch.Tensor:
        """T: the module's output as (B, d) rows (pooled over H, W with ``pool``, else flattened)."""
        if self.pool and outputs.dim() == 4:
            outputs = outputs.mean(dim=(2, 3))
        return outputs.flatten(1) if outputs.dim() > 2 else outputs

    def width(self, t: torch.Tensor) -> torch.Tensor | float | None:
        """σ for the rows ``t`` (B, d): a 0-d tensor with its graph (``"rms"``; None for a batch of one
        row, where I = 0 at any width), a number, or None (Silverman's rule, in the op)."""
        if self.sigma == "silverman" or (self.sigma == "rms" and t.shape[0] < 2):
            return None
        if self.sigma != "rms":
            return self.sigma
        # A floor instead of a test (no host synchronisation): rows without spread give I = 0 at any width.
        return self.sigma_scale * (2.0 * t.float().var(dim=0).sum()).clamp_min(1e-12).sqrt()

    def local(self, ctx: LocalContext) -> LocalLossOutput:
        t = self.representation(ctx.outputs)
        sigma = self.width(t)
        if isinstance(sigma, torch.Tensor):  # differentiate through σ: I(T; Y) at width σ is I(T/σ; Y) at width 1
            t, sigma = t / sigma.to(t.dtype), 1.0
        mi = renyi_mutual_information(t, ctx.target, sigma=sigma, label_sigma=self.label_sigma)
        return LocalLossOutput(-mi, None, {"mi": mi.detach()})
