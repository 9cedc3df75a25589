"""Local losses: what each module of a :class:`llkern.LocalNet` minimises.

A local loss is an ``nn.Module`` whose ``forward`` takes a :class:`LocalContext` (the
module's detached input, its output, its head, the targets, the residual branches of
its blocks and, where given, the network's input image) and returns a :class:`LocalLossOutput`.
Write a new objective by subclassing :class:`LocalLoss`; combine objectives with weights or
per-module schedules in :class:`Composite`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llkern.nn.heads import ProjectionHead
from llkern.ops.similarity import renyi_mutual_information, supcon_loss
from llkern.ops.transport import REDUCTIONS as TRANSPORT_REDUCTIONS
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
    # The network's input (detached), for losses that reconstruct it (Reconstruction); None where the
    # caller does not pass it.
    image: torch.Tensor | None = None


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
    """Cross-entropy of the module's head on its output: ``CE(head(outputs), target)``, the mean over the
    targets that are not ``ignore_index`` (``F.cross_entropy``'s ``reduction="mean"``).

    Logits ``(B, classes)`` take targets ``(B,)``; per-token logits ``(B, T, classes)`` take ``(B, T)``.
    A head with a fused ``loss(features, target, ...)`` method (:class:`llkern.nn.heads.LinearHead`)
    computes it without forming logits; any other head is called for logits. A batch whose targets are
    all ``ignore_index`` gives a loss of 0 with zero gradients (not NaN). The accuracy counts the
    targets that are not ``ignore_index`` (``correct`` and ``counted`` of the output).

    Args:
        label_smoothing: ε in [0, 1].
        ignore_index: targets equal to it contribute neither loss, gradient nor accuracy.
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        super().__init__()
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) \
                or not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"CrossEntropy: expected label_smoothing in [0, 1], got {label_smoothing!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"CrossEntropy: expected ignore_index to be an int, got {ignore_index!r}")
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}"

    def forward(self, ctx: LocalContext) -> LocalLossOutput:
        fused = getattr(ctx.head, "loss", None)
        if callable(fused):
            loss, correct = fused(ctx.outputs, ctx.target, label_smoothing=self.label_smoothing,
                                  ignore_index=self.ignore_index)
            counted = (ctx.target != self.ignore_index).sum()
            return LocalLossOutput(loss, None, {"ce": loss.detach()}, correct=correct, counted=counted)
        logits = ctx.head(ctx.outputs)
        rows, target = logits.reshape(-1, logits.shape[-1]), ctx.target.reshape(-1)
        if target.shape[0] != rows.shape[0]:
            raise ValueError(f"CrossEntropy: expected one target per row of the head's logits {list(logits.shape)} "
                             f"(shape {list(logits.shape[:-1])}), got target of shape {list(ctx.target.shape)}")
        # the sum over the kept targets divided by their number: F.cross_entropy's "mean", but 0 (not NaN)
        # when every target is ignore_index
        keep = target != self.ignore_index
        counted = keep.sum()
        loss = F.cross_entropy(rows, target, reduction="sum", label_smoothing=self.label_smoothing,
                               ignore_index=self.ignore_index)
        loss = loss / counted.clamp_min(1).to(loss.dtype)
        correct = ((rows.detach().argmax(dim=-1) == target) & keep).sum()
        return LocalLossOutput(loss, logits, {"ce": loss.detach()}, correct=correct, counted=counted)


TAU_SCHEDULES = ("constant", "varying")


def transport_tau(k: int, num_modules: int, tau: float, schedule: str = "constant") -> float:
    """τ of module ``k``: ``tau`` ("constant"), or ``tau/2`` on the first ⌊K/2⌋ modules ("varying", TRGL)."""
    if schedule not in TAU_SCHEDULES:
        raise ValueError(f"expected tau_schedule to be one of {TAU_SCHEDULES}, got {schedule!r}")
    if schedule == "varying" and k < num_modules // 2:
        return tau / 2.0
    return tau


class TransportRegularized(LocalLoss):
    """TRGL: a task loss plus the transport penalty, ``L_k = task + (1/2τ_k)·Σ_blocks mean(r²)``.

    ``r`` is the residual branch of each block of module k (``on="blocks"``: ``y = shortcut(x) + r``), or the
    displacement ``y − x`` of the whole module (``on="module"``). A module that is not residual has no r: with
    ``on="blocks"`` its penalty is 0 (with a warning), with ``on="module"`` a shape change is an error.

    Args:
        task: the task loss (default None: :class:`CrossEntropy`); ``False`` for the penalty alone (terms:
            ``"transport"`` only), e.g. as one term of a :class:`Composite`.
        tau: τ (TRGL used 1 for K = 4, 8, 16 and 100 for K = 2 on ResNet-110).
        tau_schedule: ``"constant"`` or ``"varying"`` (τ/2 on the first ⌊K/2⌋ modules).
        on: ``"blocks"`` sums the penalty over the residual branches of the module's blocks
            (blocks that define ``forward_residual(x) -> (y, r)``); ``"module"`` penalises
            ``y − x`` of the whole module (input and output must have the same shape).
        reduction: ``"mean"`` or ``"sum_per_sample"``, as in :func:`llkern.functional.transport_penalty`.
        impl: implementation switch of the op.
    """

    def __init__(self, task: LocalLoss | bool | None = None, tau: float = 1.0, tau_schedule: str = "constant",
                 on: str = "blocks", reduction: str = "mean", impl: str = "auto") -> None:
        super().__init__()
        if task is not None and task is not False and not isinstance(task, LocalLoss):
            raise TypeError(f"TransportRegularized: expected task to be a llkern.nn.losses.LocalLoss, None or False, "
                            f"got {type(task).__name__}")
        if on not in ("blocks", "module"):
            raise ValueError(f"TransportRegularized: expected on to be 'blocks' or 'module', got {on!r}")
        tau = _positive_number("TransportRegularized", "tau", tau)
        if reduction not in TRANSPORT_REDUCTIONS:
            raise ValueError(f"TransportRegularized: expected reduction to be one of {TRANSPORT_REDUCTIONS}, "
                             f"got {reduction!r}")
        transport_tau(0, 1, tau, tau_schedule)  # validates the schedule name
        self.task = None if task is False else (task if task is not None else CrossEntropy())
        self.tau, self.tau_schedule, self.on, self.reduction, self.impl = tau, tau_schedule, on, reduction, impl
        self._warned_no_residual: set[int] = set()

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, tau_schedule={self.tau_schedule!r}, on={self.on!r}, reduction={self.reduction!r}"
                + (", task=False" if self.task is None else ""))

    def forward(self, ctx: LocalContext) -> LocalLossOutput:
        out = self.task(ctx) if self.task is not None else None
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
            penalty = None
        if out is None:  # the penalty alone, in its own dtype (float64 stays float64)
            loss = _no_loss(ctx) if penalty is None else penalty
            return LocalLossOutput(loss, None, {"transport": loss.detach()})
        if penalty is None:
            penalty = out.loss.new_zeros(())
        terms = dict(out.terms)
        terms["transport"] = penalty.detach()
        return LocalLossOutput(out.loss + penalty.to(out.loss.dtype), out.logits, terms, correct=out.correct,
                               counted=out.counted)


def _no_loss(ctx: LocalContext) -> torch.Tensor:
    """A loss of 0 that ``backward()`` accepts: a leaf that requires grad, so the module gets no gradient
    (its ``.grad`` stays untouched) instead of an error or NaNs from ``0 · outputs``."""
    return torch.zeros((), dtype=torch.float32, device=ctx.outputs.device, requires_grad=True)


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
            raise TypeError(f"{name}: expected last_module_task to be True, False or a llkern.nn.losses.LocalLoss, "
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
                                 "head is a ProjectionHead; give it a classifier (e.g. llkern.nn.heads."
                                 "contrastive_heads(num_classes, num_modules) with num_modules = K)")
            return self.task(ctx)
        return self.local(ctx)


class SupervisedContrastive(_LastModuleTask):
    """InfoPro's contrastive local objective: the supervised contrastive loss of the module's head
    projections, ``supcon_loss(head(outputs), target, temperature)``
    (:func:`llkern.ops.similarity.supcon_loss`, rows L2-normalised).

    The head of such a module should be a projection head (:class:`llkern.nn.heads.ProjectionHead`:
    mean-pool + MLP); the loss has no logits, so ``StepResult.accuracies[k]`` is None. As in
    InfoPro, the last module is trained by a task loss instead (``last_module_task``, default
    :class:`CrossEntropy`) so the network ends in a classifier: use
    :func:`llkern.nn.heads.contrastive_heads` for the heads. Terms: ``"supcon"``, or the task loss's
    (``"ce"``) on the last module.

    With z the projections ``(N, d)`` (``(B,T,d)`` per-token projections are N = B·T samples, targets
    ``(B,T)``), ẑ = z/‖z‖ and ``s_ij = ẑ_i·ẑ_j/τ``: ``L = mean_i −(1/|P(i)|) Σ_{p∈P(i)} [s_ip − LSE_{a≠i} s_ia]``,
    ``P(i) = {p ≠ i : y_p = y_i}``, over the anchors with a positive (0 where none has one).

    Args:
        temperature: τ > 0 (default 0.07, InfoPro's).
        normalize: L2-normalise the projections first (default True).
        ignore_index: samples whose label is this value (e.g. padding tokens) are left out, as anchors,
            positives and negatives, as :class:`CrossEntropy`'s ``ignore_index``; None keeps every sample.
            Default -100. A batch without a kept sample gives a loss of 0. Selecting the samples reads the
            labels on the host (one synchronisation per call).
        last_module_task: ``True`` (default): :class:`CrossEntropy` on the last module; a
            :class:`LocalLoss`: that loss on the last module; ``False``: the contrastive loss on every
            module (then no head is trained as a classifier).
    """

    def __init__(self, temperature: float = 0.07, *, normalize: bool = True, ignore_index: int | None = -100,
                 last_module_task: LocalLoss | bool = True) -> None:
        name = "SupervisedContrastive"
        super().__init__(name, last_module_task)
        self.temperature = _positive_number(name, "temperature", temperature)
        self.normalize = bool(normalize)
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise TypeError(f"{name}: expected ignore_index to be an int or None, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, ignore_index={self.ignore_index}"

    def local(self, ctx: LocalContext) -> LocalLossOutput:
        z = ctx.head(ctx.outputs)
        target = ctx.target
        if z.dim() > 2:  # per-token projections (B,T,d): every token is a sample
            z, target = z.reshape(-1, z.shape[-1]), target.reshape(-1)
        if self.ignore_index is not None and target.shape == z.shape[:1]:  # (a wrong shape: the op names it)
            keep = target != self.ignore_index
            if not bool(keep.all()):
                if not bool(keep.any()):  # a zero that still reaches the head (see MutualInformation.local)
                    zero = z.reshape(-1)[0] * 0.0
                    return LocalLossOutput(zero, None, {"supcon": zero.detach()})
                z, target = z[keep], target[keep]
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
        readout: a callable (an ``nn.Module`` to keep the net picklable) mapping the module's output to
            the ``(B, d)`` rows T, in place of ``pool``/flattening; e.g. :class:`llkern.nn.graph.GraphReadout`
            (one row per graph of a padded batch). Default None.
        ignore_index: rows whose label is this value are left out of I(T; Y) (semi-supervised node
            classification: the unlabelled nodes), as :class:`CrossEntropy`'s ``ignore_index``; the width
            ``"rms"`` is then measured on the kept rows. None keeps every row. Default -100. A batch
            without a kept row gives a loss of 0 without gradient. Selecting the rows reads the labels
            on the host (one synchronisation per call).
        last_module_task: as in :class:`SupervisedContrastive`.
    """

    def __init__(self, sigma: float | str = "rms", *, sigma_scale: float = 0.5, label_sigma: float | None = None,
                 pool: bool = False, readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 ignore_index: int | None = -100, last_module_task: LocalLoss | bool = True) -> None:
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
        if readout is not None and not callable(readout):
            raise TypeError(f"{name}: expected readout to be a callable (an nn.Module) or None, "
                            f"got {type(readout).__name__}")
        self.readout = readout
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise TypeError(f"{name}: expected ignore_index to be an int or None, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        return (f"sigma={self.sigma!r}, sigma_scale={self.sigma_scale}, label_sigma={self.label_sigma}, "
                f"pool={self.pool}, ignore_index={self.ignore_index}")

    def representation(self, outputs: torch.Tensor) -> torch.Tensor:
        """T: the module's output as (B, d) rows (``readout``'s, else pooled over H, W with ``pool``, else
        flattened)."""
        if self.readout is not None:
            t = self.readout(outputs)
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != outputs.shape[0]:
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"MutualInformation: expected readout to return ({outputs.shape[0]}, d) rows, "
                                 f"got {shape}")
            return t
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
        t = t if t.dtype == torch.float64 else t.float()  # float64 rows keep a float64 width
        return self.sigma_scale * (2.0 * t.var(dim=0).sum()).clamp_min(1e-12).sqrt()

    def local(self, ctx: LocalContext) -> LocalLossOutput:
        t = self.representation(ctx.outputs)
        # a zero that still reaches the module's parameters: a batch without labelled rows gives them
        # zero gradients, not none (under DistributedDataParallel every process must reduce the same ones)
        # (one element is enough: autograd's edges are per tensor; a sum could overflow in 16 bits)
        connected_zero = t.reshape(-1)[0] * 0.0
        target = ctx.target
        if self.ignore_index is not None:
            if target.dim() == 1 and target.shape[0] == t.shape[0]:
                keep = target != self.ignore_index
                if not bool(keep.all()):  # the labelled rows only
                    if not bool(keep.any()):
                        return LocalLossOutput(connected_zero, None, {"mi": connected_zero.detach()})
                    t, target = t[keep], target[keep]
            elif bool((target == self.ignore_index).any()):
                raise ValueError(f"MutualInformation: target holds ignore_index={self.ignore_index}, which only a "
                                 f"target of one label per row of T ({t.shape[0]},) can mark; got target of shape "
                                 f"{list(target.shape)}")
        sigma = self.width(t)
        if isinstance(sigma, torch.Tensor):  # differentiate through σ: I(T; Y) at width σ is I(T/σ; Y) at width 1
            t, sigma = t / sigma.to(t.dtype), 1.0
        mi = renyi_mutual_information(t, target, sigma=sigma, label_sigma=self.label_sigma)
        return LocalLossOutput(connected_zero - mi, None, {"mi": mi.detach()})


# --- reconstruction (InfoPro) -------------------------------------------------------------------------------------

def _weight(name: str, arg: str, value: object) -> float:
    """A loss weight: a finite number >= 0 (0 switches a term off)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {arg} to be a number, got {type(value).__name__}")
    if not (math.isfinite(float(value)) and float(value) >= 0.0):
        raise ValueError(f"{name}: expected {arg} to be a finite number >= 0, got {value!r}")
    return float(value)


DecoderFactory = Callable[[int, torch.Size], nn.Module]


class Reconstruction(LocalLoss):
    """InfoPro's reconstruction term: ``weight · MSE(decoder_k(outputs), image)``, the network's input image
    reconstructed from module k's output (:class:`llkern.nn.heads.ReconstructionDecoder`).

    InfoPro's decoder ends in a sigmoid and a binary cross-entropy against the image in [0, 1]; llkern's inputs
    are standardised (not in [0, 1]), so the decoder is linear and the loss the mean squared error
    ``F.mse_loss(decoder(outputs), image)`` (mean over every element). The image is ``ctx.image``; where the caller
    leaves it None, module 0 uses its own input (in :class:`llkern.LocalNet` module 0's input is the image) and
    any other module raises. Term ``"recon"``: the MSE, unweighted. No logits.

    Args:
        decoders: one ``nn.Module`` (the decoder of whichever module this loss serves: build one loss per
            module with a loss factory), a list of K modules (module k uses ``decoders[k]``), or a factory
            ``f(k, feature_shape) -> nn.Module`` such as :func:`llkern.nn.heads.reconstruction_decoders`, built for
            ``feature_shapes`` (here, or later by :meth:`build`; build it before creating the optimizer).
        weight: a factor ≥ 0 on the MSE (default 1; in a :class:`Composite` leave it 1 and weigh the term there).
        feature_shapes: the K module output shapes for a decoder factory
            (:func:`llkern.nn.heads.feature_shapes`).

    With :class:`llkern.LocalTrainer` give each module its own loss (``losses=lambda k, K: ...``): the trainer
    gives module k the parameters of ``net.losses[k]``, so K decoders in one shared loss would all go to module 0.
    """

    def __init__(self, decoders: nn.Module | Sequence[nn.Module] | DecoderFactory, weight: float = 1.0, *,
                 feature_shapes: Sequence[torch.Size | tuple[int, ...]] | None = None) -> None:
        super().__init__()
        self.weight = _weight("Reconstruction", "weight", weight)
        self.factory: DecoderFactory | None = None
        self.shared = False  # one decoder for every module this loss serves
        if isinstance(decoders, (list, tuple, nn.ModuleList)):
            if len(decoders) == 0:
                raise ValueError("Reconstruction: expected decoders to hold at least one decoder, got an empty list")
            for k, decoder in enumerate(decoders):
                if not isinstance(decoder, nn.Module):
                    raise TypeError(f"Reconstruction: expected decoders[{k}] to be an nn.Module, "
                                    f"got {type(decoder).__name__}")
            self.decoders = nn.ModuleList(decoders)
        elif isinstance(decoders, nn.Module):
            self.decoders = nn.ModuleList([decoders])
            self.shared = True
        elif callable(decoders):
            self.factory = decoders
            self.decoders = nn.ModuleList()
        else:
            raise TypeError(f"Reconstruction: expected decoders to be an nn.Module, a list of them or a factory "
                            f"f(k, feature_shape), got {type(decoders).__name__}")
        if feature_shapes is not None:
            if self.factory is None:
                raise ValueError("Reconstruction: feature_shapes is for a decoder factory; the decoders were given")
            self.build(feature_shapes)

    def extra_repr(self) -> str:
        return f"weight={self.weight}" + (", shared=True" if self.shared else "")

    @property
    def built(self) -> bool:
        """Whether the decoders exist (always, unless a factory awaits :meth:`build`)."""
        return len(self.decoders) > 0

    def build(self, feature_shapes: Sequence[torch.Size | tuple[int, ...]]) -> None:
        """Build the decoders from the factory: decoder k = ``factory(k, feature_shapes[k])``.

        Args:
            feature_shapes: the K module output shapes, e.g. ``llkern.nn.heads.feature_shapes(blocks, x[:2])``.
        """
        if self.factory is None:
            raise RuntimeError("Reconstruction.build: the decoders were given as modules, or are built already")
        shapes = list(feature_shapes)
        if not shapes:
            raise ValueError("Reconstruction: expected feature_shapes to hold one shape per module, got none")
        decoders = []
        for k, shape in enumerate(shapes):
            decoder = self.factory(k, torch.Size(shape))
            if not isinstance(decoder, nn.Module):
                raise TypeError(f"Reconstruction: expected the decoder factory to return an nn.Module for module {k}, "
                                f"got {type(decoder).__name__}")
            decoders.append(decoder)
        self.decoders = nn.ModuleList(decoders)
        self.factory = None  # done with it; a closure would also keep the loss from pickling (LocalNet.save)

    def decoder(self, k: int, num_modules: int) -> tuple[nn.Module, str]:
        """Module ``k``'s decoder and how to name it in an error."""
        if self.shared:
            return self.decoders[0], "decoders"
        if not self.built:
            raise RuntimeError("Reconstruction: the decoder factory has no decoders yet; give feature_shapes="
                               "llkern.nn.heads.feature_shapes(blocks, example_input), or call build(feature_shapes) "
                               "before creating the optimizer")
        if len(self.decoders) != num_modules:
            raise ValueError(f"Reconstruction: expected decoders to hold {num_modules} decoders (one per module), "
                             f"got {len(self.decoders)}")
        return self.decoders[k], f"decoders[{k}]"

    @staticmethod
    def target_image(ctx: LocalContext) -> torch.Tensor:
        """The image to reconstruct: ``ctx.image``, or module 0's own input where ``ctx.image`` is None."""
        if ctx.image is not None:
            return ctx.image.detach()
        if ctx.k == 0:
            return ctx.inputs.detach()
        raise RuntimeError(f"Reconstruction: module {ctx.k} needs the network's input image, but LocalContext.image "
                           "is None (the caller must pass image=...; only module 0 can use its own input)")

    def forward(self, ctx: LocalContext) -> LocalLossOutput:
        decoder, arg = self.decoder(ctx.k, ctx.num_modules)
        image = self.target_image(ctx)
        reconstruction = decoder(ctx.outputs)
        if reconstruction.shape != image.shape:
            raise ValueError(f"Reconstruction: expected {arg} (module {ctx.k}'s decoder) to return the input image's "
                             f"shape {list(image.shape)}, got {list(reconstruction.shape)}")
        mse = F.mse_loss(reconstruction, image.to(reconstruction.dtype))
        loss = mse if self.weight == 1.0 else self.weight * mse
        return LocalLossOutput(loss, None, {"recon": mse.detach()})


# --- weights, schedules and composite losses ----------------------------------------------------------------------

Schedule = Callable[[int, int], float]


class LinearSchedule:
    """A per-module weight ``w(k, K)`` varying linearly from ``first`` (module 0) to ``last``.

    ``final=None``: over all modules, ``w = first + (last − first)·k/(K−1)`` (``first`` for K = 1).
    ``final`` given (InfoPro): modules 0..K−2 go from ``first`` to ``last``, ``w = first + (last − first)·k/(K−2)``
    (``first`` for K = 2), and the last module, trained by the task loss alone in InfoPro, gets ``final``.

    Args:
        first: the weight of module 0 (≥ 0).
        last: the weight of module K−1, or of K−2 with ``final`` (≥ 0).
        final: the weight of module K−1, or None.
    """

    def __init__(self, first: float, last: float, *, final: float | None = None) -> None:
        self.first = _weight("LinearSchedule", "first", first)
        self.last = _weight("LinearSchedule", "last", last)
        self.final = None if final is None else _weight("LinearSchedule", "final", final)

    def __call__(self, k: int, num_modules: int) -> float:
        if isinstance(num_modules, bool) or not isinstance(num_modules, int) or num_modules < 1:
            raise ValueError(f"LinearSchedule: expected num_modules to be an int >= 1, got {num_modules!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_modules:
            raise IndexError(f"LinearSchedule: module {k!r} is out of range for {num_modules} modules")
        scheduled = num_modules
        if self.final is not None:
            if k == num_modules - 1:
                return self.final
            scheduled = num_modules - 1
        ratio = k / (scheduled - 1) if scheduled > 1 else 0.0
        return self.first * (1.0 - ratio) + self.last * ratio

    def __repr__(self) -> str:
        final = "" if self.final is None else f", final={self.final}"
        return f"LinearSchedule(first={self.first}, last={self.last}{final})"


# InfoPro's published (λ1, λ2) of its first and last local module (modules 0 and K−2), CIFAR-10, from the
# authors' run script (blackfeather-wang/InfoPro-Pytorch, "Experiments on CIFAR-SVHN-STL10/comand.sh": --ixx_1
# --ixy_1 --ixx_2 --ixy_2), λ1 on the reconstruction and λ2 on the contrastive loss. "resnet110*" is InfoPro*
# (modules balanced by memory). With K = 2 only ``first`` is used.
INFOPRO_WEIGHTS: dict[tuple[str, int], tuple[tuple[float, float], tuple[float, float]]] = {
    ("resnet32", 2): ((5.0, 1.0), (0.0, 0.0)),
    ("resnet32", 4): ((6.0, 0.0), (1.0, 2.0)),
    ("resnet32", 8): ((5.0, 0.0), (0.0, 2.0)),
    ("resnet32", 16): ((5.0, 0.05), (0.2, 0.5)),
    ("resnet110", 2): ((5.0, 0.5), (0.0, 0.0)),
    ("resnet110", 4): ((1.0, 0.0), (0.0, 1.0)),
    ("resnet110", 8): ((5.0, 0.0), (0.0, 1.0)),
    ("resnet110", 16): ((5.0, 0.0), (0.5, 1.0)),
    ("resnet110*", 2): ((5.0, 0.1), (0.0, 0.0)),
    ("resnet110*", 3): ((5.0, 0.0), (5.0, 0.1)),
    ("resnet110*", 4): ((5.0, 0.0), (5.0, 0.1)),
}


def infopro_schedule(first: tuple[float, float], last: tuple[float, float],
                     final: tuple[float, float] = (0.0, 1.0)) -> tuple[LinearSchedule, LinearSchedule]:
    """InfoPro's weights as two per-module schedules ``(λ1, λ2)``: λ1 weighs the reconstruction term, λ2 the
    cross-entropy or contrastive term; both vary linearly from module 0 (``first``) to module K−2 (``last``),
    as InfoPro's code (``ratio = k/(K−2)``, 0 for K = 2), and the last module gets ``final`` (default
    ``(0, 1)``: InfoPro trains it by the cross-entropy alone).

    ``llkern.nn.losses.INFOPRO_WEIGHTS[("resnet32", 4)]`` holds the published ``(first, last)`` for CIFAR-10::

        recon, task = infopro_schedule(*INFOPRO_WEIGHTS["resnet32", 4])
        losses = lambda k, K: Composite([(Reconstruction(decoders[k]), recon), (SupervisedContrastive(), task)])

    With :class:`SupervisedContrastive` (whose last module is trained by cross-entropy) λ2 = 1 at the last module
    gives exactly InfoPro's last module.

    Args:
        first: ``(λ1, λ2)`` of module 0.
        last: ``(λ1, λ2)`` of module K−2.
        final: ``(λ1, λ2)`` of module K−1.
    """
    pairs = {"first": first, "last": last, "final": final}
    for arg, pair in pairs.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"infopro_schedule: expected {arg} to be a pair (λ1, λ2), got {pair!r}")
    return (LinearSchedule(first[0], last[0], final=final[0]), LinearSchedule(first[1], last[1], final=final[1]))


class Composite(LocalLoss):
    """A weighted sum of local losses: ``Σ_i w_i(k, K) · term_i(ctx)``.

    Each weight is a number ≥ 0 or a per-module schedule ``f(k, K) -> float`` (:class:`LinearSchedule`,
    :func:`infopro_schedule`). A term whose weight is 0 at module k is not evaluated there (no head or decoder
    call; its terms are not reported). The terms report each sub-loss's own terms, unweighted
    (``"ce"``, ``"supcon"``, ``"recon"``, ``"transport"``, ``"mi"``; a term without named terms reports its loss
    under its class name in lower case); a name already taken by an earlier term gets the suffix ``_i``, i the
    term's index. The accuracy (logits, or the fused head's counts) comes from the first evaluated term that gives
    it. A module where every weight is 0 gets a loss of 0 and no gradient.

    Any :class:`LocalLoss` composes: :class:`CrossEntropy`, :class:`SupervisedContrastive`,
    :class:`Reconstruction`, :class:`MutualInformation`, and the transport penalty alone as
    ``TransportRegularized(task=False)`` (``TransportRegularized()`` includes its own cross-entropy). Note that
    :class:`SupervisedContrastive` and :class:`MutualInformation` train the last module by cross-entropy.

    Args:
        terms: ``[(loss, weight), ...]``, at least one; a bare :class:`LocalLoss` has weight 1.
    """

    def __init__(self, terms: Sequence[tuple[LocalLoss, float | Schedule] | LocalLoss]) -> None:
        super().__init__()
        if not isinstance(terms, (list, tuple)):
            raise TypeError(f"Composite: expected terms to be a list of (LocalLoss, weight) pairs, "
                            f"got {type(terms).__name__}")
        if not terms:
            raise ValueError("Composite: expected terms to hold at least one (LocalLoss, weight) pair, got none")
        losses, weights = [], []
        for i, item in enumerate(terms):
            if isinstance(item, LocalLoss):
                loss, weight = item, 1.0
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                loss, weight = item
            else:
                raise TypeError(f"Composite: expected terms[{i}] to be a (LocalLoss, weight) pair, got {item!r}")
            if not isinstance(loss, LocalLoss):
                raise TypeError(f"Composite: expected terms[{i}][0] to be a llkern.nn.losses.LocalLoss, "
                                f"got {type(loss).__name__}")
            if not callable(weight):
                weight = _weight("Composite", f"the weight of terms[{i}]", weight)
            losses.append(loss)
            weights.append(weight)
        self.terms = nn.ModuleList(losses)
        self.schedules: list[float | Schedule] = weights

    def extra_repr(self) -> str:
        return "weights=[" + ", ".join(repr(w) for w in self.schedules) + "]"

    def weights(self, k: int, num_modules: int) -> list[float]:
        """The weights of the terms at module ``k`` of ``num_modules``."""
        values = []
        for i, weight in enumerate(self.schedules):
            if callable(weight):
                weight = _weight("Composite", f"the schedule of terms[{i}] at module {k} of {num_modules}",
                                 weight(k, num_modules))
            values.append(weight)
        return values

    def forward(self, ctx: LocalContext) -> LocalLossOutput:
        total: torch.Tensor | None = None
        terms: dict[str, torch.Tensor] = {}
        accuracy: LocalLossOutput | None = None
        for i, (term, weight) in enumerate(zip(self.terms, self.weights(ctx.k, ctx.num_modules), strict=True)):
            if weight == 0.0:
                continue  # switched off at this module: skip its head/decoder entirely
            out = term(ctx)
            weighted = out.loss if weight == 1.0 else weight * out.loss
            total = weighted if total is None else total + weighted
            named = out.terms or {type(term).__name__.lower(): out.loss}
            for name, value in named.items():
                terms[name if name not in terms else f"{name}_{i}"] = value.detach()
            if accuracy is None and (out.logits is not None or (out.correct is not None and out.counted is not None)):
                accuracy = out
        if total is None:
            total = _no_loss(ctx)
        if accuracy is None:
            return LocalLossOutput(total, None, terms)
        return LocalLossOutput(total, accuracy.logits, terms, correct=accuracy.correct, counted=accuracy.counted)
