"""Local losses: what each module of a :class:`llkern.LocalNet` minimises.

A local loss is an ``nn.Module`` whose ``forward`` takes a :class:`LocalContext` (the
module's detached input, its output, its head, the targets, and the residual branches of
its blocks) and returns a :class:`LocalLossOutput`. Write a new objective by subclassing
:class:`LocalLoss`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

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
