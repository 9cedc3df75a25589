"""Training a :class:`llkern.LocalNet`: :class:`LocalTrainer`.

One optimizer per module (block k, head k, loss k and the context encoders that feed module k),
stepped right after that module's backward, so that module k's gradients are applied and freed
before module k+1 allocates its own. On top of :meth:`LocalNet.local_step` the trainer adds:

* modes: ``"simultaneous"`` (every module on every batch) and ``"sequential"`` (MOLE's regime:
  module k for its epochs, then frozen, then module k+1);
* precision: fp32, bf16 autocast, fp16 autocast with one gradient scaler per module;
* per-module gradient-norm clipping and learning-rate schedules;
* gradient accumulation: ``accumulate`` batches' gradients per optimizer step, for a larger effective
  batch in the activation memory of one batch;
* data parallelism: each module under its own ``torch.nn.parallel.DistributedDataParallel``
  (:class:`llkern.local.net.ModuleStep`), so module k's gradients are all-reduced during module k's
  backward, before its optimizer steps;
* ``fit`` with per-epoch log rows (per-module loss and accuracy, step time, peak saved bytes),
  a progress bar, JSON/CSV logs, checkpoints and exact resume.

Example::

    trainer = llkern.LocalTrainer(net, optimizer=lambda p: torch.optim.Adam(p, lr=2e-3), precision="bf16")
    rows = trainer.fit((x_train, y_train), epochs=10, eval_data=(x_test, y_test), log="log.json")
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llkern.local.logs import LogSink, check_log_path, write_log
from llkern.local.memory import MemoryMeter
from llkern.local.net import LocalNet, ModuleStep, StepResult

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]

MODES = ("simultaneous", "sequential")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULER_INTERVALS = ("epoch", "step")
CHECKPOINT_VERSION = 1


def default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The default optimizer factory: SGD, learning rate 0.1, momentum 0.9."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def module_parts(net: LocalNet, k: int) -> list[nn.Module]:
    """The sub-modules that module ``k`` trains (:meth:`LocalNet.module_parts`)."""
    return net.module_parts(k)


def module_parameters(net: LocalNet) -> list[list[nn.Parameter]]:
    """The parameters each module's optimizer owns (see :func:`module_parts`).

    A parameter in the parts of two modules (one loss object with parameters given for every
    module, a head passed twice) is an error: its gradient from the later module would arrive
    after the earlier module's optimizer had stepped and cleared it, and would never be applied.
    """
    owner: dict[int, int] = {}
    groups = []
    for k in range(net.num_modules):
        group = []
        for part in module_parts(net, k):
            for p in part.parameters():
                if id(p) in owner and owner[id(p)] != k:
                    raise ValueError(
                        f"LocalTrainer: a parameter of shape {list(p.shape)} belongs to modules {owner[id(p)]} and "
                        f"{k} (one {type(part).__name__} shared by both?); each module needs its own heads and "
                        "losses with parameters: pass a list, or a factory f(k, K) for the losses")
                if id(p) not in owner:
                    owner[id(p)] = k
                    group.append(p)
        groups.append(group)
    return groups


def module_ddp(net: LocalNet, k: int, process_group: Any, find_unused_parameters: bool,
               broadcast_buffers: bool) -> nn.Module:
    """``DistributedDataParallel(ModuleStep(net, k))`` over ``process_group``: module k's gradients are
    averaged during its own backward; ``broadcast_buffers`` copies the group's first rank's buffers
    (BatchNorm statistics) before each forward."""
    from torch.nn.parallel import DistributedDataParallel

    # torch ≥ 2.13 names the per-forward buffer broadcast forward_sync_buffers (and warns on the old name)
    sync_option = ("forward_sync_buffers" if "forward_sync_buffers" in
                   inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")
    return DistributedDataParallel(ModuleStep(net, k), process_group=process_group,
                                   find_unused_parameters=find_unused_parameters, **{sync_option: broadcast_buffers})


def _per_module(name: str, spec: Any, num_modules: int) -> list[Any]:
    if isinstance(spec, (list, tuple)):
        if len(spec) != num_modules:
            raise ValueError(f"LocalTrainer: expected {num_modules} {name} (one per module), got {len(spec)}")
        return list(spec)
    return [spec] * num_modules


def _flat_apply(tensors: list[torch.Tensor], op: Callable[[torch.Tensor], None]) -> None:
    """Apply an in-place collective ``op`` to ``tensors`` through one flat buffer per (device, dtype):
    one message per bucket instead of one per tensor."""
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    with torch.no_grad():
        for group in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            op(flat)
            for t, chunk in zip(group, flat.split([t.numel() for t in group]), strict=True):
                t.copy_(chunk.view_as(t))


def _warn_unowned(net: LocalNet, groups: list[list[nn.Parameter]]) -> None:
    """Warn about parameters no module owns (a LocalNet subclass's extras): no optimizer steps them."""
    owned = {id(p) for group in groups for p in group}
    extra = [name for name, p in net.named_parameters() if id(p) not in owned]
    if extra:
        warnings.warn(f"LocalTrainer: parameters outside every module are not trained: {extra[:5]}", stacklevel=3)


def _restore_rng(rng: dict[str, Any]) -> None:
    """Restore the global RNG states :meth:`LocalTrainer.state_dict` saved (torch, CUDA, NumPy, Python)."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), *rest))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def _make_output_folders(sinks: Sequence[LogSink], checkpoint: str | os.PathLike[str] | None, lead: bool) -> None:
    """The folders of fit's log paths (written by the lead process) and checkpoint (a missing one failed only
    after the first epoch's work)."""
    paths = [sink for sink in sinks if not callable(sink)] if lead else []
    for path in [*paths, *([checkpoint] if checkpoint is not None else [])]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _advance_sampler(data: Any, epoch: int) -> None:
    """A DataLoader's sampler told the epoch, if it shuffles by epoch (``DistributedSampler``: without it, every
    epoch had the same order)."""
    sampler = getattr(data, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _mean_or_none(total: float, count: int) -> float | None:
    return total / count if count else None


class LocalTrainer:
    """Trains a :class:`llkern.LocalNet` with one optimizer per module.

    Args:
        net: the network; its parameters must be materialised (build it with ``example_input``).
        mode: ``"simultaneous"`` (every module trained on every batch) or ``"sequential"`` (module k
            trained for ``epochs_per_module[k]`` epochs, then frozen, then module k+1).
        optimizer: a factory ``f(params) -> torch.optim.Optimizer`` called once per module with that
            module's parameters (:func:`module_parameters`), or a list of K factories. Default SGD,
            lr 0.1, momentum 0.9.
        scheduler: None, a factory ``f(optimizer) -> LR scheduler`` called per module, or a list of K
            (None entries allowed).
        scheduler_interval: ``"epoch"`` (step the schedulers at the end of each epoch) or ``"step"``
            (after each optimizer step, e.g. for ``OneCycleLR``). In sequential mode a module's
            scheduler advances only while that module trains.
        precision: ``"fp32"``, ``"bf16"`` (``torch.autocast``) or ``"fp16"`` (autocast and one
            ``torch.amp.GradScaler`` per module). Heads and losses run in float32 (see
            :meth:`LocalNet.local_step`).
        clip_grad_norm: None, or the largest gradient 2-norm of each module (its own parameters
            only, after unscaling); default None.
        epochs_per_module: sequential mode's epochs per module, an int or K ints; default 1.
        distributed: data parallel over the processes of ``process_group`` (an initialised
            ``torch.distributed`` group): module k's training forward runs through
            ``DistributedDataParallel(ModuleStep(net, k))`` (:attr:`ddp`), which averages module k's
            gradients over the processes during its backward. Every process must run the same steps.
        process_group: the group for ``distributed`` (default: the world).
        broadcast_buffers: with ``distributed``, DDP copies rank 0's buffers of a module (BatchNorm
            statistics) to every process before that module's forward (DDP's default).
        find_unused_parameters: with ``distributed``, DDP's option of that name: needed when a module
            has parameters that its local loss does not use (the heads of the modules before the last
            under :class:`llkern.nn.losses.MutualInformation`). Default None: True when a loss of the net
            is a ``MutualInformation``, else False (the cheaper setting; the step after the first one
            that leaves a parameter unused raises an error saying to set it).
        measure_memory: record the peak bytes saved for backward per epoch in ``fit`` (a
            :class:`llkern.MemoryMeter` around the steps; it costs a Python call per saved tensor).
        seed: seed of the generator that shuffles tensor data in ``fit``; default: drawn from
            torch's global generator.
        accumulate: batches per optimizer step (default 1). Each module sums the gradients of
            ``accumulate`` consecutive batches, each batch's loss divided by ``accumulate``, and steps
            once: the mean gradient of an ``accumulate × batch_size`` batch in the activation memory of
            one batch (BatchNorm still normalises each batch by itself). A batch of another size (an
            epoch's last) counts by its samples (its first dimension), as in the larger batch. The
            gradients stay allocated between the batches (every trained module's, the size of its
            parameters); with ``distributed`` they are all-reduced once per step. An epoch's last, shorter
            group steps at :meth:`end_epoch` with the mean over its samples (``fit`` calls it; :meth:`flush`
            applies pending gradients at any time). A step that raises drops the group's pending
            gradients (the modules before the failing one may have stepped). ``scheduler_interval="step"``
            counts optimizer steps.

    ``step(x, y)`` trains on one batch; ``fit`` runs epochs; ``evaluate`` measures loss and accuracy;
    ``save``/``load`` checkpoint and resume.
    """

    def __init__(
        self,
        net: LocalNet,
        *,
        mode: str = "simultaneous",
        optimizer: OptimizerFactory | Sequence[OptimizerFactory] = default_optimizer,
        scheduler: SchedulerFactory | Sequence[SchedulerFactory | None] | None = None,
        scheduler_interval: str = "epoch",
        precision: str = "fp32",
        clip_grad_norm: float | None = None,
        epochs_per_module: int | Sequence[int] = 1,
        distributed: bool = False,
        process_group: Any = None,
        broadcast_buffers: bool = True,
        find_unused_parameters: bool | None = None,
        measure_memory: bool = True,
        seed: int | None = None,
        accumulate: int = 1,
    ) -> None:
        if not isinstance(net, LocalNet):
            raise TypeError(f"LocalTrainer: expected net to be a llkern.LocalNet, got {type(net).__name__}")
        if mode not in MODES:
            raise ValueError(f"LocalTrainer: expected mode to be one of {MODES}, got {mode!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"LocalTrainer: expected precision to be one of {tuple(PRECISIONS)}, got {precision!r}")
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(f"LocalTrainer: expected scheduler_interval to be one of {SCHEDULER_INTERVALS}, "
                             f"got {scheduler_interval!r}")
        if isinstance(accumulate, bool) or not isinstance(accumulate, numbers.Integral) or accumulate < 1:
            raise ValueError(f"LocalTrainer: expected accumulate to be an int >= 1 (batches per optimizer step), "
                             f"got {accumulate!r}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"LocalTrainer: expected clip_grad_norm > 0 or None, got {clip_grad_norm!r}")
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in net.parameters()):
            raise ValueError("LocalTrainer: the net has lazily sized parameters; build the LocalNet with "
                             "example_input=... so that its heads are sized before the optimizers are made")
        self.net = net
        self.mode = mode
        self.precision = precision
        self.clip_grad_norm = clip_grad_norm
        self.scheduler_interval = scheduler_interval
        self.measure_memory = measure_memory
        self.accumulate = int(accumulate)
        # batches whose gradients are summed but not yet applied, their samples, the samples of the group's
        # first batch, and whether the running step applies them
        self._pending = 0
        self._pending_samples = self._group_first = 0
        self._stepping = True
        # the running step's loss weight (its samples over the group's first batch's) and the factor that turns
        # the group's sum into the mean over its samples (the group's last batch, when not all were of one size)
        self._batch_weight = self._rescale = 1.0
        K = net.num_modules
        params = next(iter(net.parameters()), None)
        self.device = params.device if params is not None else torch.device("cpu")

        epochs = _per_module("epochs_per_module", epochs_per_module, K)
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 1 for e in epochs):
            raise ValueError(f"LocalTrainer: expected epochs_per_module to be positive ints, got {epochs_per_module!r}")
        self.epochs_per_module = epochs
        self._phase_ends = np.cumsum(epochs).tolist()

        self.module_params = module_parameters(net)
        _warn_unowned(net, self.module_params)
        self.module_parts = [module_parts(net, k) for k in range(K)]
        self.optimizers = [factory(group) for factory, group in
                           zip(_per_module("optimizers", optimizer, K), self.module_params, strict=True)]
        self.schedulers = [None if factory is None else factory(opt) for factory, opt in
                           zip(_per_module("schedulers", scheduler, K), self.optimizers, strict=True)]
        for k, sched in enumerate(self.schedulers):  # (it failed after an epoch's work, the trainer half updated)
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise ValueError(f"LocalTrainer: module {k}'s scheduler is a ReduceLROnPlateau, whose step needs a "
                                 "metric the trainer does not have; step it yourself after fit's epochs, or use a "
                                 "schedule of steps or epochs")
        # Sequential mode freezes the modules before the active one; what the caller froze stays frozen, and
        # fit gives the others back their requires_grad when it returns (taken when a phase is first applied).
        self._requires_grad: list[list[bool]] | None = None
        # fit's transform (data augmentation) and the state of its generator, saved with the checkpoints;
        # a loaded state waits here for the next fit's transform
        self._transform: Callable | None = None
        self._transform_rng: torch.Tensor | None = None
        # One scaler per module: an overflow in module k's gradients skips module k's step only
        # (its scale halves); the other modules' gradients are finite and their steps go ahead.
        self.scalers = ([torch.amp.GradScaler(self.device.type) for _ in range(K)] if precision == "fp16"
                        else [None] * K)
        self.grad_norms: list[torch.Tensor | None] = [None] * K  # before clipping, from the last step

        self.distributed = distributed
        self.process_group = process_group
        self.rank, self.world_size = 0, 1
        if distributed:
            import torch.distributed as dist

            from llkern.nn.graph import Graph
            from llkern.nn.losses import MutualInformation

            if any(isinstance(m, Graph) for m in net.modules()):
                raise ValueError("LocalTrainer(distributed=True): the net holds a llkern.nn.graph.Graph; data-parallel "
                                 "training of graph models is not supported (a graph is not split into shards, and "
                                 "its sparse buffers cannot be broadcast)")
            if find_unused_parameters is None:
                find_unused_parameters = any(isinstance(loss, MutualInformation) for loss in net.losses)

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("LocalTrainer(distributed=True): call torch.distributed.init_process_group first")
            self.rank = dist.get_rank(process_group)
            self.world_size = dist.get_world_size(process_group)
            self._source = dist.get_global_rank(process_group, 0) if process_group is not None else 0
            # Every replica starts from rank 0's parameters and buffers, those outside every module too
            # (each DDP constructor below broadcasts its own module's again).
            self._broadcast([*net.parameters(), *net.buffers()])
            # One DDP per module (a local step makes K backwards, one per module; a DDP expects one
            # backward per forward through it). A module without a trainable parameter needs none.
            self.ddp = [
                module_ddp(net, k, process_group, find_unused_parameters, broadcast_buffers)
                if any(p.requires_grad for p in self.module_params[k]) else None
                for k in range(K)]
        else:
            self.ddp = None
        if seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
        if distributed:
            # one shuffle for all processes: each takes its share of the same global batches
            shared = torch.tensor([seed], dtype=torch.int64, device=self.device)
            self._broadcast([shared])
            seed = int(shared.item())
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0          # epochs completed
        self.global_step = 0    # steps completed
        self.history: list[dict] = []
        # JSON-able values saved with every checkpoint (the command line keeps its options here)
        self.metadata: dict[str, Any] = {}
        self._phase_applied: int | None = None

    # --- modes --------------------------------------------------------------------------------------------------

    @property
    def num_modules(self) -> int:
        return self.net.num_modules

    @property
    def total_epochs(self) -> int | None:
        """Sequential mode's epoch count (the sum of ``epochs_per_module``); None in simultaneous mode."""
        return self._phase_ends[-1] if self.mode == "sequential" else None

    @property
    def active_module(self) -> int | None:
        """The module sequential mode trains in the current epoch (the last one once all phases are
        done); None in simultaneous mode."""
        if self.mode != "sequential":
            return None
        for k, end in enumerate(self._phase_ends):
            if self.epoch < end:
                return k
        return self.num_modules - 1

    def trained_modules(self) -> list[int]:
        """The modules the next step trains."""
        return list(range(self.num_modules)) if self.mode == "simultaneous" else [self.active_module]

    def _sync_phase(self) -> None:
        """Sequential mode: freeze the modules before the active one.

        A frozen module stops requiring gradients and runs in eval mode: BatchNorm normalises with
        its running statistics and stops updating them, so the features it hands on are a fixed
        function of the input, the same that inference uses (in train mode they would depend on the
        batch and the statistics would drift away from those its head and the later modules were
        trained with). Its optimizer's state (momentum, Adam moments) is dropped: it is never
        stepped again."""
        if self.mode != "sequential":
            return
        active = self.active_module
        if active == self._phase_applied:
            return
        if self._phase_applied is None:  # nothing frozen by the trainer yet: the caller's own settings
            self._requires_grad = [[p.requires_grad for p in group] for group in self.module_params]
        for k, (group, trainable) in enumerate(zip(self.module_params, self._requires_grad, strict=True)):
            for p, wanted in zip(group, trainable, strict=True):
                p.requires_grad_(wanted and k >= active)
            if k < active:
                self.optimizers[k].state.clear()
        self._phase_applied = active

    def _release_phase(self) -> None:
        """Every parameter's requires_grad as the caller left it (sequential mode froze the early modules); the
        next step freezes again."""
        if self.mode != "sequential" or self._phase_applied is None:
            return
        for group, trainable in zip(self.module_params, self._requires_grad, strict=True):
            for p, wanted in zip(group, trainable, strict=True):
                p.requires_grad_(wanted)
        self._phase_applied = None

    def _use_transform(self, transform: Callable | None) -> None:
        """Keep fit's transform; a checkpoint's state of its generator goes into it (an exact resume replays
        the augmentation that the uninterrupted run would have drawn)."""
        self._transform = transform
        generator = getattr(transform, "generator", None)
        if self._transform_rng is not None and isinstance(generator, torch.Generator):
            generator.set_state(self._transform_rng)
            self._transform_rng = None

    def _transform_state(self) -> torch.Tensor | None:
        generator = getattr(self._transform, "generator", None)
        return generator.get_state() if isinstance(generator, torch.Generator) else self._transform_rng

    def _set_train_modes(self) -> None:
        self.net.train()
        active = self.active_module
        if active is None:
            return
        for k in range(active):
            for part in self.module_parts[k]:
                part.eval()
        for part in self.module_parts[active]:  # a part shared with a frozen module trains with the active one
            part.train()

    # --- one step -----------------------------------------------------------------------------------------------

    def _autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    def _broadcast(self, tensors: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        _flat_apply(tensors, lambda flat: dist.broadcast(flat, src=self._source, group=self.process_group))

    def _backward(self, k: int, loss: torch.Tensor) -> None:
        if self.accumulate > 1:
            if self._rescale != 1.0:  # before this backward (and DDP's all-reduce in it): this process's mean
                grads = [p.grad for p in self.module_params[k] if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, self._rescale)
            if self._batch_weight != 1.0:
                loss = loss * self._batch_weight
            loss = loss / self.accumulate
            if self._rescale != 1.0:
                loss = loss * self._rescale
        scaler = self.scalers[k]
        (loss if scaler is None else scaler.scale(loss)).backward()

    def _after_backward(self, k: int) -> None:
        """Module k's update, run inside local_step before module k+1's forward (with ``distributed``,
        its DDP has averaged the gradients during the backward), unless the step only accumulates."""
        if self._stepping:
            self._update(k)

    def _update(self, k: int) -> None:
        """Module k's update from its gradients: unscale, clip, step, free the gradients."""
        params = [p for p in self.module_params[k] if p.grad is not None]
        optimizer, scaler = self.optimizers[k], self.scalers[k]
        if params:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if self.clip_grad_norm is not None:
                self.grad_norms[k] = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)  # skipped when module k's gradients hold inf/NaN
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.scheduler_interval == "step" and self.schedulers[k] is not None:
            self.schedulers[k].step()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Train on one batch: per trained module, forward, local loss, backward and its optimizer step.

        In sequential mode only :attr:`active_module` trains; the modules before it run forward only,
        the ones after it not at all. The net is put in train mode (frozen modules in eval mode)."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        self._sync_phase()
        self._set_train_modes()
        modules = self.trained_modules()
        if self._pending == 0:
            for k in modules:  # gradients left by the caller would be added to this step's
                self.optimizers[k].zero_grad(set_to_none=True)
        self._stepping = self._pending + 1 >= self.accumulate
        if self.accumulate > 1:
            # each batch's loss counts by its samples, relative to the group's first batch; the group's last
            # batch turns the sum into the mean over the group's samples (a factor 1 when all had one size)
            samples = int(y.shape[0]) if y.dim() else 1
            if self._pending == 0:
                self._group_first = samples
            self._pending_samples += samples
            self._batch_weight = samples / self._group_first
            self._rescale = (self.accumulate * self._group_first / self._pending_samples if self._stepping
                             else 1.0)
        # DDP's no_sync for the batches that only accumulate: their gradients are all-reduced with the last's
        syncing = [w for w in (self.ddp or []) if w is not None]
        for wrapper in syncing:
            wrapper.require_backward_grad_sync = self._stepping
        done = False
        try:
            result = self.net.local_step(x, y, modules=modules, backward=self._backward,
                                         after_backward=self._after_backward, autocast=self._autocast_dtype(),
                                         wrappers=self.ddp)
            done = True
        except RuntimeError as error:
            if self.distributed and "find_unused_parameters" in str(error):
                raise RuntimeError(
                    "LocalTrainer(distributed=True): a module has parameters its local loss did not use (the "
                    "heads of all but the last module under MutualInformation, say); pass "
                    "LocalTrainer(..., find_unused_parameters=True)") from error
            raise
        finally:
            for wrapper in syncing:
                wrapper.require_backward_grad_sync = True
            if not done and self.accumulate > 1:
                # the modules before the failing one hold part of this batch's gradients (or stepped on them):
                # the group cannot be completed as it was; it is dropped (its next step starts a new one)
                self._drop_pending(modules)
        if self._stepping:
            self._drop_pending([])
        else:
            self._pending += 1
        self.global_step += 1
        return result

    def _drop_pending(self, modules: Iterable[int]) -> None:
        """Forget the accumulated group: the gradients of ``modules`` set to None, the counts to 0."""
        for k in modules:
            self.optimizers[k].zero_grad(set_to_none=True)
        self._pending = self._pending_samples = self._group_first = 0
        self._batch_weight = self._rescale = 1.0

    def _average_gradients(self, k: int) -> None:
        """Module k's gradients averaged over the processes (batches accumulated under DDP's no_sync). The same
        messages on every process: a parameter with a gradient on some processes only counts zeros on the others
        (as DDP does), one with none anywhere keeps none."""
        import torch.distributed as dist

        params = [p for p in self.module_params[k] if p.requires_grad]
        if not params:
            return
        held = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=self.device)
        dist.all_reduce(held, group=self.process_group)
        for p, count in zip(params, held.tolist(), strict=True):
            if count and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            _flat_apply(grads, lambda flat: dist.all_reduce(flat, group=self.process_group))
            torch._foreach_div_(grads, self.world_size)

    def flush(self) -> None:
        """Apply the gradients accumulated since the last optimizer step (``accumulate > 1``), as the mean over
        the samples of the batches they came from; nothing when none are pending. :meth:`end_epoch` calls it."""
        if self._pending == 0:
            return
        # each batch's loss was divided by accumulate, not by the _pending batches there are, and weighted by its
        # samples relative to the group's first batch
        scale = self.accumulate * self._group_first / self._pending_samples
        for k in self.trained_modules():
            grads = [p.grad for p in self.module_params[k] if p.grad is not None]
            with torch.no_grad():
                if grads:  # (before the all-reduce: each process's own mean, as in a step)
                    torch._foreach_mul_(grads, scale)
                if self.distributed:  # these batches ran under no_sync: average over the processes now
                    self._average_gradients(k)
            self._update(k)
        self._drop_pending([])

    def end_epoch(self) -> None:
        """Count an epoch as done: apply pending accumulated gradients (:meth:`flush`), then step the
        epoch-interval schedulers of the modules trained in it (``fit`` calls this; call it yourself when you
        drive ``step``)."""
        self.flush()
        if self.scheduler_interval == "epoch":
            for k in self.trained_modules():
                if self.schedulers[k] is not None:
                    self.schedulers[k].step()
        self.epoch += 1

    # --- evaluation ---------------------------------------------------------------------------------------------

    def _eval_batches(self, x: torch.Tensor | Batches, y: torch.Tensor | None, batch_size: int) -> Iterator:
        if y is None:
            for batch in x:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise ValueError("LocalTrainer.evaluate: expected x, y tensors, or an iterable of (x, y) batches "
                                     f"as x with y None; x gave a {type(batch).__name__}")
                yield batch
        else:
            for start in range(0, len(x), batch_size):
                yield x[start:start + batch_size], y[start:start + batch_size]

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor | Batches, y: torch.Tensor | None = None, *, exit: int | str = -1,
                 batch_size: int = 512, ignore_index: int = -100) -> dict[str, Any]:
        """Cross-entropy and accuracy of head ``exit`` (default the last; ``"all"`` for every head).

        ``x, y`` are tensors (evaluated in batches of ``batch_size``), or ``x`` is an iterable of
        ``(x, y)`` batches and ``y`` None (a graph's nodes: ``[(features, target)]``). Targets equal
        to ``ignore_index`` (unlabelled nodes) count in neither the loss nor the accuracy. Runs in eval
        mode under the trainer's autocast and restores the net's mode. Returns
        ``{"loss": ..., "accuracy": ...}``, floats (lists of K for ``"all"``).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"LocalTrainer.evaluate: expected batch_size to be an int >= 1, got {batch_size!r}")
        if exit != "all" and (isinstance(exit, bool) or not isinstance(exit, numbers.Integral)):
            raise ValueError(f"LocalTrainer.evaluate: expected exit to be a module index or 'all', got {exit!r}")
        if y is not None and len(x) != len(y):  # (sliced apart, they gave a plausible wrong loss and accuracy)
            raise ValueError(f"LocalTrainer.evaluate: expected x and y of the same length, got {len(x)} and {len(y)}")
        was_training = self.net.training
        self.net.eval()
        every = exit == "all"
        count = 0
        losses = torch.zeros(self.num_modules if every else 1, dtype=torch.float64)
        correct = torch.zeros_like(losses)
        try:
            for xb, yb in self._eval_batches(x, y, batch_size):
                xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
                with contextlib.ExitStack() as stack:
                    if self._autocast_dtype() is not None:
                        stack.enter_context(torch.autocast(self.device.type, dtype=self._autocast_dtype()))
                    outputs = self.net.forward_all(xb) if every else [self.net(xb, exit=exit)]
                target = yb.reshape(-1)
                counted = target != ignore_index
                for i, logits in enumerate(outputs):
                    if logits.shape[:-1].numel() != target.shape[0]:
                        raise ValueError(f"LocalTrainer.evaluate: a batch of {len(xb)} inputs gives "
                                         f"{logits.shape[:-1].numel()} predictions for {target.shape[0]} targets")
                    logits = logits.float().reshape(target.shape[0], -1)
                    losses[i] += F.cross_entropy(logits, target, reduction="sum", ignore_index=ignore_index).item()
                    correct[i] += ((logits.argmax(dim=-1) == target) & counted).sum().item()
                count += int(counted.sum())
        finally:
            self.net.train(was_training)
        if count == 0:
            raise ValueError("LocalTrainer.evaluate: expected a non-empty evaluation set (with at least one target "
                             f"other than ignore_index={ignore_index})")
        loss, accuracy = (losses / count).tolist(), (correct / count).tolist()
        return {"loss": loss, "accuracy": accuracy} if every else {"loss": loss[0], "accuracy": accuracy[0]}

    # --- fit ----------------------------------------------------------------------------------------------------

    def _train_batches(self, data: Any, batch_size: int, shuffle: bool) -> tuple[Iterator, int | None]:
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            x, y = data
            if len(x) != len(y):
                raise ValueError(f"LocalTrainer.fit: expected x and y with the same number of samples, got "
                                 f"{len(x)} and {len(y)}")
            n = len(x)
            order = torch.randperm(n, generator=self.generator) if shuffle else torch.arange(n)

            def batches() -> Iterator:
                for start in range(0, n, batch_size):
                    index = order[start:start + batch_size]
                    if self.distributed:
                        # batch_size is the global batch: each process takes an equal contiguous share, so
                        # the step averages what one process would on the whole batch. The last
                        # len % world_size samples are left out (every process computes the same sizes,
                        # so all skip a batch too small to share together and the collectives stay paired).
                        usable = len(index) - len(index) % self.world_size
                        if usable == 0:
                            continue
                        index = index[:usable].view(self.world_size, -1)[self.rank]
                    yield x[index], y[index]

            return batches(), math.ceil(n / batch_size)
        return iter(data), (len(data) if hasattr(data, "__len__") else None)

    def fit(
        self,
        data: Batches | tuple[torch.Tensor, torch.Tensor],
        epochs: int | None = None,
        *,
        batch_size: int = 64,
        shuffle: bool = True,
        eval_data: Batches | tuple[torch.Tensor, torch.Tensor] | None = None,
        eval_exit: int | str = -1,
        progress: bool = True,
        log: LogSink | Sequence[LogSink] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[dict]:
        """Train until ``epochs`` epochs are done in total (a resumed trainer continues where it stopped).

        Args:
            data: an iterable of ``(x, y)`` batches (a ``DataLoader``; with ``distributed`` give each
                process its shard), or ``(x, y)`` tensors, cut into batches of ``batch_size`` (the
                global batch with ``distributed``: each process takes an equal share, and a batch's last
                ``len % world_size`` samples are left out) and shuffled with the trainer's generator.
            epochs: the total epoch count; in sequential mode default and at most
                ``sum(epochs_per_module)``.
            eval_data: ``(x, y)`` tensors or an iterable of batches, evaluated after each epoch at head
                ``eval_exit`` (an index, or ``"all"``).
            progress: show a tqdm progress bar (on rank 0 only with ``distributed``).
            log: where each epoch's row goes (by rank 0 only with ``distributed``): a callable given the
                row, or a path (``.json``, ``.jsonl``, ``.csv``) rewritten with the whole history; or a
                list of them (see :mod:`llkern.local.logs`: ``EpochPrinter``, ``TensorBoardLogger``).
            checkpoint: a path the trainer is saved to after each epoch (see :meth:`save`).
            transform: applied to every training batch's inputs before the step (data augmentation,
                e.g. :class:`llkern.data.RandomCropFlip`); not to ``eval_data``.

        Returns:
            :attr:`history`, one JSON-able row per epoch: ``epoch`` (1-based), ``mode``,
            ``active_module``, ``steps``, ``samples``, ``loss`` and ``accuracy`` (per module, sample
            means over the epoch on this process; None for a module not trained), ``lr`` (per module,
            the first parameter group's, after the epoch's scheduler step: the next epoch's starting
            rate), ``loss_scale`` (fp16, per module), ``step_time_s`` (mean), ``epoch_time_s``,
            ``peak_saved_bytes`` and ``cuda_peak_bytes`` (the epoch's peaks, see :class:`llkern.MemoryMeter`),
            ``eval_loss`` and ``eval_accuracy``.
        """
        if epochs is None:
            if self.mode != "sequential":
                raise ValueError("LocalTrainer.fit: give epochs (sequential mode defaults to sum(epochs_per_module))")
            epochs = self.total_epochs
        # (epochs=-1 once returned [] quietly and epochs=2.5 trained three epochs)
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
            raise ValueError(f"LocalTrainer.fit: expected epochs to be an int >= 1, got {epochs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"LocalTrainer.fit: expected batch_size to be an int, got {batch_size!r}")
        if self.mode == "sequential" and epochs > self.total_epochs:
            raise ValueError(f"LocalTrainer.fit: sequential mode trains for sum(epochs_per_module) = "
                             f"{self.total_epochs} epochs, got epochs={epochs}")
        if batch_size < 1:
            raise ValueError(f"LocalTrainer.fit: expected batch_size >= 1, got {batch_size}")
        if transform is not None and not callable(transform):
            raise TypeError(f"LocalTrainer.fit: expected transform to be callable, got {type(transform).__name__}")
        sinks = [] if log is None else list(log) if isinstance(log, (list, tuple)) else [log]
        for sink in sinks:  # a bad log path fails now, not after the first epoch's work
            if not callable(sink):
                try:
                    check_log_path(sink)
                except (TypeError, ValueError) as error:
                    raise ValueError(f"LocalTrainer.fit: log: {error}") from None
        _make_output_folders(sinks, checkpoint, lead=self.rank == 0)
        self._use_transform(transform)
        try:
            return self._fit(data, epochs, batch_size, shuffle, eval_data, eval_exit, progress, sinks, checkpoint,
                             transform)
        finally:
            self._release_phase()

    def _fit(self, data: Batches | tuple[torch.Tensor, torch.Tensor], epochs: int, batch_size: int, shuffle: bool,
             eval_data: Any, eval_exit: int | str, progress: bool, sinks: list[LogSink],
             checkpoint: str | os.PathLike[str] | None, transform: Callable | None) -> list[dict]:
        """fit's epochs, its arguments checked."""
        from tqdm import tqdm

        lead = self.rank == 0
        K = self.num_modules
        while self.epoch < epochs:
            _advance_sampler(data, self.epoch)
            batches, total = self._train_batches(data, batch_size, shuffle)
            loss_sum, acc_sum = [0.0] * K, [0.0] * K
            loss_n, acc_n = [0] * K, [0] * K
            steps = samples = 0
            step_time = 0.0
            meter = MemoryMeter(exclude=self.net.parameters()) if self.measure_memory else None
            bar = tqdm(batches, total=total, desc=f"epoch {self.epoch + 1}/{epochs}", leave=False,
                       disable=not (progress and lead))
            started = time.perf_counter()
            with meter if meter is not None else contextlib.nullcontext():
                for xb, yb in bar:
                    t0 = time.perf_counter()
                    if transform is not None:
                        xb = transform(xb.to(self.device, non_blocking=True))
                    result = self.step(xb, yb)
                    step_time += time.perf_counter() - t0
                    n = len(yb)
                    steps, samples = steps + 1, samples + n
                    for k in range(K):
                        if result.losses[k] is not None:
                            loss_sum[k] += result.losses[k] * n
                            loss_n[k] += n
                        if result.accuracies[k] is not None:
                            acc_sum[k] += result.accuracies[k] * n
                            acc_n[k] += n
                    bar.set_postfix_str("loss " + " ".join("-" if v is None else f"{v:.3f}" for v in result.losses),
                                        refresh=False)
            bar.close()
            epoch_time = time.perf_counter() - started
            if steps == 0:
                raise ValueError("LocalTrainer.fit: the training data gave no batch")
            active = self.active_module
            self.end_epoch()
            row: dict[str, Any] = {
                "epoch": self.epoch,
                "mode": self.mode,
                "active_module": active,
                "steps": steps,
                "samples": samples,
                "loss": [_mean_or_none(loss_sum[k], loss_n[k]) for k in range(K)],
                "accuracy": [_mean_or_none(acc_sum[k], acc_n[k]) for k in range(K)],
                "lr": [float(opt.param_groups[0]["lr"]) for opt in self.optimizers],
                "loss_scale": ([float(s.get_scale()) for s in self.scalers] if self.precision == "fp16" else None),
                "step_time_s": step_time / steps,
                "epoch_time_s": epoch_time,
                "peak_saved_bytes": meter.peak_saved_bytes if meter is not None else None,
                "cuda_peak_bytes": meter.cuda_peak_bytes if meter is not None else None,
                "eval_loss": None,
                "eval_accuracy": None,
            }
            if eval_data is not None:
                if isinstance(eval_data, (tuple, list)) and len(eval_data) == 2 \
                        and isinstance(eval_data[0], torch.Tensor):
                    evaluated = self.evaluate(eval_data[0], eval_data[1], exit=eval_exit)
                else:
                    evaluated = self.evaluate(eval_data, exit=eval_exit)
                row["eval_loss"], row["eval_accuracy"] = evaluated["loss"], evaluated["accuracy"]
            self.history.append(row)
            if lead:
                for sink in sinks:
                    if callable(sink):
                        sink(row)
                    else:
                        write_log(self.history, sink)
            if checkpoint is not None and lead:
                self.save(checkpoint)
        return self.history

    # --- checkpoints --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: the net, optimizers, schedulers, scalers, epoch and step
        counts, history, the data generator and the global RNG states (torch, CUDA, NumPy, Python).
        Refused while accumulated gradients are pending (they are not state a checkpoint keeps)."""
        if self._pending:
            raise RuntimeError(f"{type(self).__name__}.state_dict: {self._pending} batch(es) of gradients are "
                               f"accumulated (accumulate={self.accumulate}) and not yet applied; call flush() or "
                               "end_epoch() first (fit saves its checkpoints at epoch ends, after them)")
        numpy_state = np.random.get_state()
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # as plain types and a tensor, so that the checkpoint loads with weights_only=True
            "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
            "python": random.getstate(),
        }
        return {
            "version": CHECKPOINT_VERSION,
            "mode": self.mode,
            "precision": self.precision,
            "num_modules": self.num_modules,
            "net": self.net.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [None if s is None else s.state_dict() for s in self.schedulers],
            "scalers": [None if s is None else s.state_dict() for s in self.scalers],
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": self.history,
            "metadata": self.metadata,
            "generator": self.generator.get_state(),
            "rng": rng,
            "transform_rng": self._transform_state(),
        }

    def load_state_dict(self, state: dict[str, Any], *, restore_rng: bool = True) -> None:
        """Restore :meth:`state_dict`'s output into this trainer (built with the same net layout,
        mode, precision and factories)."""
        self._check_state(state)
        self.net.load_state_dict(state["net"])
        self._load_module_states(state, range(self.num_modules))
        self._load_counters(state)
        self._release_phase()  # (the phase of the loaded epoch is applied next, from the caller's settings)
        self._sync_phase()
        if restore_rng:
            _restore_rng(state["rng"])

    def _check_state(self, state: dict[str, Any]) -> None:
        name = type(self).__name__
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{name}: checkpoint version {state.get('version')!r} is not {CHECKPOINT_VERSION}")
        for key, mine in (("mode", self.mode), ("precision", self.precision), ("num_modules", self.num_modules)):
            if state[key] != mine:
                raise ValueError(f"{name}: the checkpoint has {key}={state[key]!r}, this trainer {mine!r}")

    def _load_module_states(self, state: dict[str, Any], modules: Iterable[int]) -> None:
        """The optimizers, schedulers and scalers of ``modules`` from ``state``."""
        for k in modules:
            self.optimizers[k].load_state_dict(state["optimizers"][k])
            sched, saved = self.schedulers[k], state["schedulers"][k]
            if (sched is None) != (saved is None):
                raise ValueError(f"{type(self).__name__}: the checkpoint's schedulers do not match this trainer's")
            if sched is not None:
                sched.load_state_dict(saved)
            if self.scalers[k] is not None and state["scalers"][k] is not None:
                self.scalers[k].load_state_dict(state["scalers"][k])

    def _load_counters(self, state: dict[str, Any]) -> None:
        if self._pending:  # gradients accumulated before the load belong to the state it replaces
            self._drop_pending(range(self.num_modules))
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.metadata = dict(state.get("metadata") or {})
        self.generator.set_state(state["generator"])
        self._transform_rng = state.get("transform_rng")
        if self._transform is not None:
            self._use_transform(self._transform)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`state_dict` to ``path`` (``torch.save``; written whole, then renamed)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike[str], *, restore_rng: bool = True) -> LocalTrainer:
        """Resume from a checkpoint written by :meth:`save` into this trainer (build it as the saved one
        was: the factories are code, not state). ``fit(..., epochs=E)`` then continues to epoch E.
        Loads with ``weights_only=True``. Returns ``self``."""
        self.load_state_dict(self._read_checkpoint(path), restore_rng=restore_rng)
        return self

    def _read_checkpoint(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        state = torch.load(path, map_location=self.device, weights_only=True)
        # RNG states must stay CPU byte tensors whatever map_location did
        state["rng"]["torch"] = state["rng"]["torch"].cpu()
        state["rng"]["cuda"] = [s.cpu() for s in state["rng"]["cuda"]]
        state["generator"] = state["generator"].cpu()
        return state

