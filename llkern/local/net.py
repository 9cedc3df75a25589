"""Local (module-wise, gradient-isolated) training: :class:`LocalNet`.

A network is cut into K modules. Module k gets an auxiliary head and a local loss; its
input is the *detached* output of module k−1, so no gradient crosses a boundary and each
module's activations are freed by its own backward. ``local_step`` runs, for k = 0..K−1:
forward of module k, its local loss, its backward.

Residual-block protocol (TRGL's per-block transport penalty): a block that defines
``forward_residual(x) -> (y, r)`` with ``y = shortcut(x) + r`` reports its residual branch
``r``. ``LocalNet`` finds such blocks in a module and inside ``nn.Sequential`` containers
(recursively; a sequence with ``forward_residuals(x) -> (y, [r, ...])``, as ``RecomputedSequential``,
reports them itself); any other module is called as ``module(x)``.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llkern.local.planner import _is_layer, _last_layer
from llkern.nn.context import ContextSupply
from llkern.nn.heads import LinearHead, feature_channels
from llkern.nn.losses import Composite, CrossEntropy, LocalContext, LocalLoss, Reconstruction

HeadFactory = Callable[[int, "torch.Size | None"], nn.Module]
LossFactory = Callable[[int, int], LocalLoss]


def run_module(module: nn.Module, x: torch.Tensor, residuals: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``module`` on ``x``; append the residual branches of protocol blocks to ``residuals``."""
    if residuals is not None:
        if hasattr(module, "forward_residuals"):  # a sequence that runs its blocks itself (RecomputedSequential)
            y, found = module.forward_residuals(x)
            residuals.extend(found)
            return y
        if hasattr(module, "forward_residual"):
            y, r = module.forward_residual(x)
            residuals.append(r)
            return y
        if isinstance(module, nn.Sequential):
            for child in module:
                x = run_module(child, x, residuals)
            return x
    return module(x)


class Boundary:
    """A boundary tensor (a module's detached output) that ``LocalNet`` may release.

    ``tensor`` returns it while it is alive and raises a ``RuntimeError`` once released,
    so a stale read fails loudly instead of returning freed memory.
    """

    def __init__(self, k: int, tensor: torch.Tensor) -> None:
        self.k = k
        self._tensor: torch.Tensor | None = tensor

    @property
    def released(self) -> bool:
        return self._tensor is None

    @property
    def tensor(self) -> torch.Tensor:
        if self._tensor is None:
            raise RuntimeError(
                f"llkern: the boundary tensor after module {self.k} was released once the modules that read it "
                "finished their local backward; call local_step(..., keep_boundaries=True) to keep it")
        return self._tensor

    def release(self) -> None:
        """Drop LocalNet's reference: the storage is freed unless something else holds the tensor."""
        self._tensor = None


@dataclass
class StepResult:
    """What :meth:`LocalNet.local_step` returns: one entry per module (accuracy is None without logits;
    loss and accuracy are None, terms empty, for a module the step did not train)."""

    losses: list[float | None]
    accuracies: list[float | None]
    terms: list[dict[str, float]]
    boundaries: list[Boundary] = field(default_factory=list)


def _accuracy(result, target: torch.Tensor) -> torch.Tensor | None:
    if result.correct is not None and result.counted is not None:
        return result.correct.detach().float() / result.counted.clamp_min(1).float()
    if result.logits is not None:
        return (result.logits.detach().argmax(dim=-1) == target).float().mean()
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _float32_context(ctx: LocalContext) -> LocalContext:
    """``ctx`` with its floating tensors cast to float32 (the cast keeps the graph to the module)."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.is_floating_point() else t

    return LocalContext(ctx.k, ctx.num_modules, cast(ctx.inputs), cast(ctx.outputs), ctx.target, ctx.head,
                        [cast(r) for r in ctx.residuals], image=None if ctx.image is None else cast(ctx.image))


def _as_list(name: str, spec, num_modules: int, build) -> list:
    if isinstance(spec, (list, tuple, nn.ModuleList)):
        if len(spec) != num_modules:
            raise ValueError(f"LocalNet: expected {num_modules} {name} (one per module), got {len(spec)}")
        return list(spec)
    if isinstance(spec, nn.Module) or not callable(spec):
        raise TypeError(f"LocalNet: expected {name} to be a list of {num_modules} modules or a factory "
                        f"callable, got {type(spec).__name__}")
    return [build(spec, k) for k in range(num_modules)]


class _ExportedWithContext(nn.Module):
    """Modules 0..k of a LocalNet with its context encoders, and head k: ``LocalNet.forward(x, exit=k)``."""

    def __init__(self, net: LocalNet, k: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(net.blocks[:k + 1])
        self.context = net.context
        self.head = net.heads[k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, previous = x, x
        for k, block in enumerate(self.blocks):
            module_input = h if k == 0 else self.context(k, h, x, previous)
            h, previous = block(module_input), h
        return self.head(h)


@dataclass
class ModuleMemory:
    """What one module kept for its backward in a profiled local step (bytes of distinct storages, as
    :class:`llkern.MemoryMeter` counts them; parameters excluded)."""

    module: int
    peak_saved_bytes: int  # the most held during its forward, local loss and backward
    freed_bytes: int  # released by its backward: what local training frees before module k+1 runs

    def __str__(self) -> str:
        return (f"module {self.module}: saved-for-backward peak {self.peak_saved_bytes / 2**20:.2f} MiB, "
                f"freed by its backward {self.freed_bytes / 2**20:.2f} MiB")


def _first_floating(blocks: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor | None:
    """The blocks' first floating-point parameter or buffer, else a floating ``example_input``, else None: the
    device and dtype of the parts LocalNet makes itself."""
    for tensor in [*blocks.parameters(), *blocks.buffers()]:
        if tensor.is_floating_point() and not isinstance(tensor, nn.parameter.UninitializedParameter) \
                and tensor.device.type != "meta":
            return tensor
    if isinstance(example_input, torch.Tensor) and example_input.is_floating_point():
        return example_input
    return None


class LocalNet(nn.Module):
    """K local modules, one auxiliary head and one local loss each.

    Args:
        blocks: the K modules, in order (each an ``nn.Module``; ``nn.Sequential`` of blocks is typical), e.g.
            ``llkern.split(model, K).modules``. Warns when ``blocks`` is itself an ``nn.Sequential`` with single
            layers among its entries (each entry becomes a module), and when the last module ends in an
            ``nn.Linear`` under the default heads (a head after the model's classifier).
        num_classes: class count for the default heads (needed when ``heads`` is None).
        heads: a list of K heads, or a factory ``f(k, feature_shape) -> nn.Module`` where
            ``feature_shape`` is module k's output shape on ``example_input`` (None without one).
            Default: :class:`llkern.nn.heads.LinearHead` (mean-pool + linear). The default heads and the
            context encoders take the device and floating dtype of the blocks' first floating parameter or
            buffer (``example_input``'s for blocks without one): a float64 or bfloat16 model gets heads of its
            dtype. Heads you pass are used as they are.
        losses: a list of K :class:`LocalLoss`, one :class:`LocalLoss` for every module, or a factory
            ``f(k, K) -> LocalLoss``. Default: :class:`llkern.nn.losses.CrossEntropy`.
        example_input: a small batch used to size the heads; without it heads are sized lazily
            on the first call.
        context: ContSup's context supply for modules 1..K−1: ``"E"`` (image encoder), ``"R"``
            (previous boundary's encoder) or ``"RE"``; None (default) for none. Needs
            ``example_input``. See :mod:`llkern.nn.context`; ``net.context.cost()`` gives the encoders'
            parameters and FLOPs.
        context_impl: implementation of the fused context add (``"auto"``, ``"kernel"``, ``"reference"``).

    ``net(x)`` returns the last head's logits; ``net(x, exit=k)`` head k's (0-based; negative
    counts from the end). ``net.local_step(x, y)`` trains; the optimizer step is the caller's.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        *,
        num_classes: int | None = None,
        heads: Sequence[nn.Module] | HeadFactory | None = None,
        losses: Sequence[LocalLoss] | LocalLoss | LossFactory | None = None,
        example_input: torch.Tensor | None = None,
        context: str | None = None,
        context_impl: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(blocks, nn.Sequential):
            layers = [f"{name} ({type(m).__name__})" for name, m in blocks.named_children() if _is_layer(m)]
            if layers:
                warnings.warn(
                    f"LocalNet: blocks is an nn.Sequential, so each of its {len(blocks)} entries becomes a local "
                    f"module with its own head and loss, and some are single layers: {', '.join(layers[:6])}"
                    f"{', ...' if len(layers) > 6 else ''}. Cut the model with llkern.split(model, k) (it keeps blocks "
                    "and nn.Sequential groups of layers whole and ends modules after nonlinearities) and pass "
                    "plan.modules, or pass a list of modules that group the layers, e.g. "
                    "[nn.Sequential(conv, bn, relu), ...]", UserWarning, stacklevel=2)
        blocks = list(blocks)
        if not blocks:
            raise ValueError("LocalNet: expected at least one module in blocks")
        for k, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"LocalNet: expected blocks[{k}] to be an nn.Module, got {type(block).__name__}")
        last = _last_layer(blocks[-1], f"blocks[{len(blocks) - 1}]")
        if heads is None and last is not None and isinstance(last[1], nn.Linear):
            classifier = getattr(last[1], "out_features", None) == num_classes
            warnings.warn(
                f"LocalNet: the last module ends in an nn.Linear ({last[0]}: {last[1]})"
                f"{', probably the model classifier' if classifier else ''}, and the default head (LinearHead: "
                "pooling, then a linear map to num_classes) goes after it: two linear maps in a row"
                f"{', a second classifier stacked on the first' if classifier else ''}. Drop the final Linear from "
                "the last module (its head classifies in its place: e.g. llkern.split(model[:-1], k)) or pass heads=",
                UserWarning, stacklevel=2)
        self.blocks = nn.ModuleList(blocks)
        num_modules = len(blocks)

        shapes: list[torch.Size | None] = [None] * num_modules
        if example_input is not None:
            shapes = self._feature_shapes(example_input)

        default_heads = heads is None
        if heads is None:
            if num_classes is None:
                raise ValueError("LocalNet: give num_classes (for the default heads) or heads")
            # (num_classes=2.5 once failed deep inside a tensor constructor)
            if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
                raise ValueError(f"LocalNet: expected num_classes to be an int >= 1, got {num_classes!r}")

            def heads(k, shape):
                return LinearHead(num_classes, None if shape is None else feature_channels(shape))

        self.heads = nn.ModuleList(_as_list("heads", heads, num_modules, lambda f, k: f(k, shapes[k])))
        like = _first_floating(self.blocks, example_input)
        if default_heads and like is not None:  # (float32 CPU heads failed on a float64 or CUDA model's features)
            self.heads.to(device=like.device, dtype=like.dtype)

        if losses is None:
            losses = CrossEntropy()
        if isinstance(losses, LocalLoss):
            losses = [losses] * num_modules
        self.losses = nn.ModuleList(_as_list("losses", losses, num_modules, lambda f, k: f(k, num_modules)))
        for k, loss in enumerate(self.losses):
            if not isinstance(loss, LocalLoss):
                raise TypeError(f"LocalNet: expected losses[{k}] to be a llkern.nn.losses.LocalLoss, "
                                f"got {type(loss).__name__}")
            if isinstance(loss, Composite) and not any(loss.weights(k, num_modules)):
                # e.g. schedules of published weights for another K: the module would silently never train
                warnings.warn(f"LocalNet: every term of module {k}'s Composite loss has weight 0 at module {k} of "
                              f"{num_modules}, so module {k} gets no gradient and does not train (schedules made "
                              "for another number of modules?)", UserWarning, stacklevel=2)
        if example_input is not None:  # decoders made by a factory are sized from the module outputs
            for loss in self.losses:
                for m in loss.modules():
                    if isinstance(m, Reconstruction) and m.factory is not None and not m.built:
                        m.build(shapes)
        self.context: ContextSupply | None = None
        if context is not None:
            if example_input is None:
                raise ValueError("LocalNet: context supply needs example_input (to size its encoders)")
            self.context = ContextSupply(context, [example_input.shape, *shapes[:-1]], impl=context_impl)
            if like is not None:
                self.context.to(device=like.device, dtype=like.dtype)
        if example_input is not None and any(self._has_lazy(h) for h in self.heads):
            was_training = self.training
            self.eval()  # materialise lazy heads now, leaving BatchNorm statistics untouched
            with torch.no_grad():
                self.forward_all(example_input)
            self.train(was_training)

    @staticmethod
    def _has_lazy(module: nn.Module) -> bool:
        return any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters())

    @torch.no_grad()
    def _feature_shapes(self, example_input: torch.Tensor) -> list[torch.Size]:
        was_training = self.training
        self.eval()  # keep BatchNorm statistics untouched
        shapes, h = [], example_input
        for block in self.blocks:
            h = block(h)
            shapes.append(h.shape)
        self.train(was_training)
        return shapes

    @property
    def num_modules(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, exit: int = -1) -> torch.Tensor:
        """Logits of head ``exit`` (default: the last), running modules 0..exit only."""
        k_exit = exit % self.num_modules if -self.num_modules <= exit < self.num_modules else None
        if k_exit is None:
            raise IndexError(f"LocalNet: exit={exit} is out of range for {self.num_modules} modules")
        h, previous = x, x
        for k, block in enumerate(self.blocks[: k_exit + 1]):
            h, previous = block(self._module_input(k, h, x, previous)), h
        return self.heads[k_exit](h)

    def forward_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head, in one pass through the modules."""
        logits, h, previous = [], x, x
        for k, (block, head) in enumerate(zip(self.blocks, self.heads, strict=True)):
            h, previous = block(self._module_input(k, h, x, previous)), h
            logits.append(head(h))
        return logits

    @torch.no_grad()
    def predict(self, x: torch.Tensor, *, threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits and, per sample, the head that gave them (early exit).

        With ``threshold`` None every sample goes through all modules to the last head. With a
        threshold in (0, 1], a sample leaves at the first head whose softmax confidence (largest class
        probability) reaches it; the modules after that run only for the samples still in. Heads must
        give class logits (not projections). Runs in the net's current mode; call ``eval()`` first.

        Returns:
            ``(logits, exits)``: ``(B, classes)`` logits and int64 ``(B,)`` head indices.
        """
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"LocalNet.predict: expected threshold in (0, 1] or None, got {threshold!r}")
        if threshold is None:
            logits = self(x)
            return logits, torch.full((x.shape[0],), self.num_modules - 1, dtype=torch.int64, device=x.device)
        out: torch.Tensor | None = None
        exits = torch.full((x.shape[0],), self.num_modules - 1, dtype=torch.int64, device=x.device)
        live = torch.arange(x.shape[0], device=x.device)  # the samples still going
        h, previous, image = x, x, x
        for k, (block, head) in enumerate(zip(self.blocks, self.heads, strict=True)):
            h, previous = block(self._module_input(k, h, image, previous)), h
            logits = head(h)
            if logits.dim() != 2:
                raise ValueError(f"LocalNet.predict: head {k} gives logits of shape {list(logits.shape)}; early exit "
                                 "needs (batch, classes)")
            if out is None:
                out = logits.new_empty((x.shape[0], logits.shape[1]))
            done = logits.softmax(dim=1).amax(dim=1) >= threshold if k < self.num_modules - 1 else \
                torch.ones_like(live, dtype=torch.bool)
            out[live[done]] = logits[done]
            exits[live[done]] = k
            keep = ~done
            if not bool(keep.any()):
                break
            live, h, previous, image = live[keep], h[keep], previous[keep], image[keep]
        return out, exits

    def export(self, exit: int = -1) -> nn.Module:
        """The trained network as a plain module without the auxiliary heads it does not use: modules
        0..``exit`` and head ``exit`` (default the last), as an ``nn.Sequential`` (with a context supply,
        a module that also runs its encoders). Shares the parameters; ``copy.deepcopy`` it to detach."""
        k_exit = exit % self.num_modules if -self.num_modules <= exit < self.num_modules else None
        if k_exit is None:
            raise IndexError(f"LocalNet.export: exit={exit} is out of range for {self.num_modules} modules")
        if self.context is None:
            return nn.Sequential(*self.blocks[:k_exit + 1], self.heads[k_exit])
        return _ExportedWithContext(self, k_exit)

    def save(self, path: str | Path) -> None:
        """Write the whole net — modules, heads, losses, context encoders and their configuration — to
        ``path`` (``torch.save`` of the module: :meth:`load` unpickles it, so load only files you trust)."""
        torch.save({"llkern_local_net": 1, "net": self}, path)

    @staticmethod
    def load(path: str | Path, map_location: str | torch.device | None = None) -> LocalNet:
        """A net written by :meth:`save`. It unpickles Python objects: only load files you trust."""
        blob = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(blob, dict) or blob.get("llkern_local_net") != 1 or not isinstance(blob.get("net"), LocalNet):
            raise ValueError(f"LocalNet.load: {path} is not a LocalNet written by LocalNet.save")
        return blob["net"]

    def _module_input(self, k: int, boundary: torch.Tensor, image: torch.Tensor,
                      previous: torch.Tensor) -> torch.Tensor:
        """Module k's input: its boundary, plus the context supply's terms when there is one."""
        if self.context is None or k == 0:
            return boundary
        return self.context(k, boundary, image, previous)

    def module_parts(self, k: int) -> list[nn.Module]:
        """The sub-modules that module ``k`` trains: block k, head k, loss k and, with a context supply,
        the encoders that feed module k (k ≥ 1)."""
        parts = [self.blocks[k], self.heads[k], self.losses[k]]
        if self.context is not None and k >= 1:
            if "E" in self.context.mode:
                parts.append(self.context.image_encoders[k - 1])
            if "R" in self.context.mode:
                parts.append(self.context.previous_encoders[k - 1])
        return parts

    def _module_step(self, k: int, h: torch.Tensor, image: torch.Tensor, previous: torch.Tensor,
                     target: torch.Tensor, autocast: torch.dtype | None):
        """Module k's training forward: its input (with the context terms), the block, the local loss.
        Returns ``(output, loss output)``; the caller runs the backward."""
        residuals: list[torch.Tensor] = []
        with _autocast(h.device, autocast):
            module_input = self._module_input(k, h, image, previous)
            out = run_module(self.blocks[k], module_input, residuals)
        ctx = LocalContext(k, self.num_modules, module_input.detach(), out, target, self.heads[k], residuals,
                           image=image)
        if autocast is not None:
            ctx = _float32_context(ctx)
        return out, self.losses[k](ctx)

    def memory_profile(self, x: torch.Tensor, target: torch.Tensor, **step_options) -> list[ModuleMemory]:
        """Run one :meth:`local_step` inside a :class:`llkern.MemoryMeter` and report, per trained module,
        the peak of its saved-for-backward bytes and the bytes its backward freed.

        The step is a real one: gradients accumulate into ``.grad`` (zero them afterwards) and BatchNorm
        statistics move. ``step_options`` go to :meth:`local_step` (``modules``, ``autocast``, ...), except
        ``backward``, which the profile uses itself.
        """
        from llkern.local.memory import MemoryMeter

        if "backward" in step_options:
            raise TypeError("LocalNet.memory_profile: the backward option is taken by the profile itself")
        rows: list[ModuleMemory] = []
        with MemoryMeter(exclude=self.parameters()) as meter:

            def backward(k: int, loss: torch.Tensor) -> None:
                before = meter.current_saved_bytes
                loss.backward()
                # the peak after the backward: a recomputed segment (recompute_segments) saves again in it
                rows.append(ModuleMemory(k, meter.peak_saved_bytes, before - meter.current_saved_bytes))
                meter.reset_peak()  # the next module's peak starts from what is left

            self.local_step(x, target, backward=backward, **step_options)
        return rows

    def local_step(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        *,
        keep_boundaries: bool = False,
        modules: int | Iterable[int] | None = None,
        backward: Callable[[int, torch.Tensor], None] | None = None,
        after_backward: Callable[[int], None] | None = None,
        autocast: torch.dtype | None = None,
        wrappers: Sequence[nn.Module | None] | None = None,
    ) -> StepResult:
        """One local training step: for each module, forward, local loss, backward.

        Gradients accumulate into ``.grad`` as with ``loss.backward()``; zero them and step the
        optimizer(s) yourself (or in ``after_backward``). Module k's input is module k−1's output,
        detached. LocalNet drops its reference to that boundary as soon as module k's backward is
        done (module k's first layer saved it), unless ``keep_boundaries=True``; the returned
        :class:`Boundary` objects then raise on access.

        Args:
            modules: the modules trained in this step (an index or indices, negative counts from the
                end); default all. The modules before the last trained one that are not trained run
                forward only, under ``torch.no_grad`` (no graph, no saved activations); the modules
                after it are not run. Untrained modules get ``None`` losses and accuracies and empty
                terms. ``modules=k`` is the sequential (MOLE) regime's step.
            backward: ``backward(k, loss)`` runs module k's backward in place of ``loss.backward()``
                (a gradient scaler scales the loss here).
            after_backward: ``after_backward(k)`` is called once module k's backward is done and its
                graph freed, before module k+1 runs: an optimizer step there frees module k's
                gradients before the next module allocates its own.
            autocast: a dtype (``torch.bfloat16``, ``torch.float16``) to run the modules' forward under
                ``torch.autocast`` on ``x``'s device; default None (no autocast). Heads and local losses
                then run in float32 on the module's output cast to float32 (autocast also keeps
                cross-entropy in float32, and the fused head op needs the weight's dtype).
            wrappers: K modules (or None entries) through which module k's training forward runs instead
                of directly: ``wrappers[k](h, image, previous, target, autocast)`` must return what
                ``ModuleStep(net, k)`` does. This is how ``LocalTrainer`` puts each module under its own
                ``DistributedDataParallel(ModuleStep(net, k))``.
        """
        for arg, value in (("x", x), ("target", target)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"LocalNet.local_step: expected {arg} to be a Tensor, got {type(value).__name__}")
            if value.dim() == 0:  # (once an IndexError from shape[0])
                raise ValueError(f"LocalNet.local_step: expected {arg} with a batch dimension, got a 0-d tensor")
        if x.shape[0] == 0:
            raise ValueError("LocalNet.local_step: expected a non-empty batch, got x of shape "
                             f"{list(x.shape)}")
        if target.shape[0] != x.shape[0]:
            raise ValueError(f"LocalNet.local_step: expected target with {x.shape[0]} entries (the batch of x), "
                             f"got shape {list(target.shape)}")
        trained = self._trained_modules(modules)
        if wrappers is not None and len(wrappers) != self.num_modules:
            raise ValueError(f"LocalNet.local_step: expected {self.num_modules} wrappers (one per module, None "
                             f"for none), got {len(wrappers)}")
        last = max(trained)
        losses: list[torch.Tensor | None] = [None] * self.num_modules
        accuracies: list[torch.Tensor | None] = [None] * self.num_modules
        terms: list[dict[str, torch.Tensor]] = [{} for _ in range(self.num_modules)]
        boundaries: list[Boundary] = []
        image = x.detach()
        h = image
        # The R context of module k reads module k−1's input boundary: keep boundaries one module longer.
        keep_previous = self.context is not None and "R" in self.context.mode
        for k, block in enumerate(self.blocks):
            if k > last:
                break
            previous = image if k <= 1 or not keep_previous else boundaries[k - 2].tensor
            if k not in trained:
                # A frozen (or not yet trained) module in front of a trained one: its output only.
                with torch.no_grad(), _autocast(x.device, autocast):
                    out = block(self._module_input(k, h, image, previous))
                del previous
            else:
                if wrappers is not None and wrappers[k] is not None:
                    out, result = wrappers[k](h, image, previous, target, autocast)
                else:
                    out, result = self._module_step(k, h, image, previous, target, autocast)
                if backward is None:
                    result.loss.backward()
                else:
                    backward(k, result.loss)
                losses[k] = result.loss.detach()
                accuracies[k] = _accuracy(result, target)
                terms[k] = {name: value.detach() for name, value in result.terms.items()}
                del result, previous
            # Module k's graph is gone; its input boundary is no longer needed (with the R context,
            # module k+1 still reads it, and the boundary before is the one now free).
            done = k - 2 if keep_previous else k - 1
            if done >= 0 and not keep_boundaries:
                boundaries[done].release()
            h = out.detach()
            del out
            boundaries.append(Boundary(k, h))
            if k in trained and after_backward is not None:
                after_backward(k)
        del h
        if not keep_boundaries:
            for boundary in boundaries[-2:]:
                boundary.release()
        # One host synchronisation for all the scalars.
        scalars = ([t for t in losses if t is not None] + [a for a in accuracies if a is not None]
                   + [v for d in terms for v in d.values()])
        values = iter(torch.stack([t.float().reshape(()) for t in scalars]).tolist())
        flat = [None if t is None else next(values) for t in losses]
        accs = [None if a is None else next(values) for a in accuracies]
        named = [{n: next(values) for n in d} for d in terms]
        return StepResult(flat, accs, named, boundaries)

    def _trained_modules(self, modules: int | Iterable[int] | None) -> set[int]:
        if modules is None:
            return set(range(self.num_modules))
        indices = [modules] if isinstance(modules, int) else list(modules)
        if not indices:
            raise ValueError("LocalNet.local_step: expected at least one module to train, got modules=[]")
        trained = set()
        for k in indices:
            if isinstance(k, bool) or not isinstance(k, int) or not -self.num_modules <= k < self.num_modules:
                raise IndexError(f"LocalNet.local_step: module {k!r} is out of range for {self.num_modules} modules")
            trained.add(k % self.num_modules)
        return trained


class ModuleStep(nn.Module):
    """Module ``k`` of a :class:`LocalNet` as one ``nn.Module`` whose forward is its training forward.

    Its sub-modules are module k's parts (:meth:`LocalNet.module_parts`: block, head, loss, context
    encoders) and nothing else, so a wrapper that hooks an ``nn.Module``'s parameters sees exactly
    the parameters module k trains: ``DistributedDataParallel(ModuleStep(net, k))`` all-reduces module
    k's gradients during module k's own backward, bucket by bucket as they are formed.
    ``forward(h, image, previous, target, autocast)`` returns ``(output, LocalLossOutput)``; pass
    the wrappers to :meth:`LocalNet.local_step` (``wrappers=``).
    """

    def __init__(self, net: LocalNet, k: int) -> None:
        super().__init__()
        if not 0 <= k < net.num_modules:
            raise IndexError(f"ModuleStep: module {k} is out of range for {net.num_modules} modules")
        self.parts = nn.ModuleList(net.module_parts(k))
        self.k = k
        object.__setattr__(self, "net", net)  # a plain reference: the net's other modules stay unregistered

    def forward(self, h: torch.Tensor, image: torch.Tensor, previous: torch.Tensor, target: torch.Tensor,
                autocast: torch.dtype | None = None):
        return self.net._module_step(self.k, h, image, previous, target, autocast)
