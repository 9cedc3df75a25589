"""Decoupled pipeline training: one group of modules per process, forward-only messages.

Local learning needs no gradient from later modules, so the modules can train at the same time on
different processes: stage ``s`` receives micro-batch ``t``'s boundary tensor from stage ``s−1``,
runs forward, local loss, backward and the optimizer step of each of its modules, and sends its
detached output to stage ``s+1``. Nothing travels backward, so no stage waits for another's
backward, and there is no pipeline bubble after the first micro-batches.

Module k's input at step t is module k−1's output from its forward at step t, computed with module
k−1's parameters before step t's update, in :meth:`LocalNet.local_step` too. So the pipeline trains
*the same parameters* as :class:`LocalTrainer`: bitwise on the CPU with deterministic ops (random
layers such as dropout draw from each process's own generator, so they differ).

Layout: ``world_size = stages × replicas``; rank ``s·R + r`` is replica ``r`` of stage ``s``. The
replicas of a stage share its modules as data-parallel copies (one ``DistributedDataParallel`` per
module over a process group of that stage only) and replica ``r`` of stage ``s`` talks to replica
``r`` of the stages next to it. Messages use ``torch.distributed`` point-to-point sends (gloo on
CPUs, NCCL on GPUs): a small header (kind, shapes, dtypes) and then the tensors.

Example (``torchrun --nproc-per-node 2 train.py``)::

    torch.distributed.init_process_group("gloo")
    net = llkern.LocalNet(llkern.split(model, 4), num_classes=10, example_input=x[:2])
    trainer = llkern.PipelineTrainer(net, stages=2)      # modules 0-1 on rank 0, 2-3 on rank 1
    trainer.fit((x, y), epochs=10, eval_data=(x_test, y_test))
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import itertools
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llkern.local.net import LocalNet, StepResult, _accuracy
from llkern.local.planner import linear_partition
from llkern.local.trainer import (
    Batches,
    LocalTrainer,
    _advance_sampler,
    _make_output_folders,
    _restore_rng,
    module_ddp,
)

__all__ = ["PipelineError", "PipelineTrainer", "Placement", "module_costs", "plan_stages", "read_shards"]

# --- placement ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Which modules each pipeline stage holds, and how many data-parallel replicas each stage has.

    ``stages[s]`` is the ``range`` of module indices of stage s: consecutive, non-empty, covering
    ``0..K−1`` in order. ``world_size = len(stages) × replicas``.
    """

    stages: tuple[range, ...]
    replicas: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"Placement: expected replicas to be an int >= 1, got {self.replicas!r}")
        if not self.stages:
            raise ValueError("Placement: expected at least one stage")
        start = 0
        for s, modules in enumerate(self.stages):
            if not isinstance(modules, range) or modules.step != 1:
                raise TypeError(f"Placement: stage {s} must be a range of consecutive module indices, got {modules!r}")
            if len(modules) == 0:
                raise ValueError(f"Placement: stage {s} has no module ({modules}); every stage needs at least one")
            if modules.start != start:
                raise ValueError(f"Placement: stage {s} starts at module {modules.start}, expected {start} "
                                 "(stages hold consecutive modules, in order)")
            start = modules.stop

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_modules(self) -> int:
        return self.stages[-1].stop

    @property
    def world_size(self) -> int:
        return self.num_stages * self.replicas

    def stage_of(self, k: int) -> int:
        return next(s for s, modules in enumerate(self.stages) if k in modules)

    @classmethod
    def balanced(cls, num_modules: int, stages: int, *, replicas: int = 1,
                 costs: Sequence[float] | None = None) -> Placement:
        """Cut ``num_modules`` modules into ``stages`` consecutive groups whose largest total cost is
        least (``costs``: one per module, e.g. :func:`module_costs`; default 1 each)."""
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"Placement: expected stages to be an int >= 1, got {stages!r}")
        if num_modules < stages:
            raise ValueError(f"Placement: {stages} stages need at least {stages} modules (one each), the net has "
                             f"{num_modules}")
        costs = [1.0] * num_modules if costs is None else [float(c) for c in costs]
        if len(costs) != num_modules:
            raise ValueError(f"Placement: expected {num_modules} costs (one per module), got {len(costs)}")
        if any(not c >= 0 or c == float("inf") for c in costs):
            raise ValueError(f"Placement: expected finite costs >= 0, got {costs}")
        prefix = [0.0]
        for c in costs:
            prefix.append(prefix[-1] + c)
        bounds = linear_partition(lambda i, j: prefix[j] - prefix[i], num_modules, stages)
        return cls(tuple(range(a, b) for a, b in itertools.pairwise(bounds)), replicas)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [[m.start, m.stop] for m in self.stages], "replicas": self.replicas}

    def __str__(self) -> str:
        parts = [f"stage {s}: module{'s' if len(m) > 1 else ''} "
                 + (f"{m.start}" if len(m) == 1 else f"{m.start}-{m.stop - 1}") for s, m in enumerate(self.stages)]
        return "; ".join(parts) + (f" (× {self.replicas} replicas)" if self.replicas > 1 else "")


def module_costs(net: LocalNet, x: torch.Tensor, y: torch.Tensor, *, by: str = "time", repeats: int = 3,
                 **step_options: Any) -> list[float]:
    """Per-module cost of one local training step on ``(x, y)``, for :func:`plan_stages`.

    ``by="time"``: the median over ``repeats`` steps of the seconds from module k's forward to the end
    of its backward (a pipeline runs at the speed of its slowest stage); ``by="saved_bytes"``: the peak
    bytes saved for module k's backward (:meth:`LocalNet.memory_profile`). The steps are real
    (BatchNorm statistics move); the gradients are dropped afterwards.
    """
    if by not in ("time", "saved_bytes"):
        raise ValueError(f"module_costs: expected by='time' or 'saved_bytes', got {by!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"module_costs: expected repeats to be an int >= 1, got {repeats!r}")
    try:
        if by == "saved_bytes":
            return [float(row.peak_saved_bytes) for row in net.memory_profile(x, y, **step_options)]
        times: list[list[float]] = [[] for _ in range(net.num_modules)]
        synchronize = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
        marks: list[float] = []

        def done(k: int) -> None:
            synchronize()
            marks.append(time.perf_counter())

        for repeat in range(repeats + 1):  # the first step warms up (allocations, kernel choice)
            marks.clear()
            synchronize()
            marks.append(time.perf_counter())
            net.local_step(x, y, after_backward=done, **step_options)
            if repeat > 0:
                for k in range(net.num_modules):
                    times[k].append(marks[k + 1] - marks[k])
        return [sorted(t)[len(t) // 2] for t in times]
    finally:
        net.zero_grad(set_to_none=True)


def plan_stages(net: LocalNet, stages: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *,
                by: str = "time", replicas: int = 1, repeats: int = 3) -> Placement:
    """Assign the modules of ``net`` to ``stages`` pipeline stages, balancing the measured cost.

    ``by="time"`` (default) or ``"saved_bytes"`` measure each module on the batch ``(x, y)``
    (:func:`module_costs`); ``by="count"`` gives each stage the same number of modules (no batch
    needed). Under ``torch.distributed`` every process measures and rank 0's costs are used by all
    (measurements differ a little from process to process; the placements must not).
    """
    if by == "count":
        return Placement.balanced(net.num_modules, stages, replicas=replicas)
    if x is None or y is None:
        raise ValueError(f"plan_stages: by={by!r} measures the modules on a batch; give x and y")
    costs = module_costs(net, x, y, by=by, repeats=repeats)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [costs]
        dist.broadcast_object_list(shared, src=0)
        costs = shared[0]
    return Placement.balanced(net.num_modules, stages, replicas=replicas, costs=costs)


# --- messages -------------------------------------------------------------------------------------------------

DATA, END, FAILED = 0, 1, 2
_KIND_NAMES = {DATA: "a micro-batch", END: "the end of the pass", FAILED: "a failure report"}
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
           torch.int8, torch.int16, torch.bool)
_MAX_TENSORS, _MAX_DIMS = 6, 6
_SLOT = 3 + _MAX_DIMS               # dtype code, ndim, channels_last flag, dims
_HEADER = 3 + _MAX_TENSORS * _SLOT  # kind, tensor count, failure-text length, slots


class PipelineError(RuntimeError):
    """A pipeline stage failed (raised, died, or stopped answering); the message names the stage."""


class _Link:
    """Point-to-point messages with one neighbour: a header (kind, shapes, dtypes), then the tensors.

    Sends are asynchronous; at most ``depth`` messages stay in flight (their tensors kept alive until
    sent), so a fast stage cannot run ahead of a slow one by more than ``depth`` micro-batches.
    """

    def __init__(self, peer: int, device: torch.device, depth: int, timeout: float) -> None:
        self.peer = peer
        self.timeout = datetime.timedelta(seconds=timeout)  # every wait's bound: a stopped neighbour is named
        self.device = device
        self.depth = depth
        self.pending: collections.deque = collections.deque()  # (works, tensors kept alive)
        self.header_work = None  # a receive of the next header, posted ahead
        self.header = None

    def send(self, kind: int, tensors: Sequence[torch.Tensor] = (), text: str = "") -> None:
        import torch.distributed as dist

        header = torch.zeros(_HEADER, dtype=torch.int64)
        encoded = torch.tensor(list(text.encode()), dtype=torch.uint8)
        header[0], header[1], header[2] = kind, len(tensors), encoded.numel()
        payload = []
        for i, t in enumerate(tensors):
            base = 3 + i * _SLOT
            # a channels_last tensor travels as its NHWC storage and arrives channels_last (a standard-layout
            # copy would make the next stage's convolutions pick other kernels than one process does)
            nhwc = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
            header[base], header[base + 1], header[base + 2] = _DTYPES.index(t.dtype), t.dim(), int(nhwc)
            header[base + 3:base + 3 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
            payload.append(t.detach().permute(0, 2, 3, 1) if nhwc else t.detach().contiguous())
        if encoded.numel():
            payload.append(encoded.to(self.device))
        header = header.to(self.device)
        works = [dist.isend(header, self.peer)] + [dist.isend(t, self.peer) for t in payload]
        self.pending.append((works, [header, *payload]))
        while len(self.pending) > self.depth:
            self._finish_oldest()

    @staticmethod
    def check(tensors: Sequence[torch.Tensor]) -> None:
        """What a message can carry (checked before anything is sent)."""
        if len(tensors) > _MAX_TENSORS:
            raise ValueError(f"PipelineTrainer: a message carries at most {_MAX_TENSORS} tensors, got {len(tensors)}")
        for t in tensors:
            if t.dim() > _MAX_DIMS:
                raise ValueError(f"PipelineTrainer: a boundary tensor has {t.dim()} dimensions; at most {_MAX_DIMS}")
            if t.dtype not in _DTYPES:
                raise TypeError(f"PipelineTrainer: a boundary tensor has dtype {t.dtype}; the messages carry "
                                f"{', '.join(str(d).replace('torch.', '') for d in _DTYPES)}")

    def _finish_oldest(self) -> None:
        works, _ = self.pending.popleft()
        for work in works:
            work.wait(self.timeout)

    def flush(self) -> None:
        while self.pending:
            self._finish_oldest()

    def post_header(self) -> None:
        import torch.distributed as dist

        if self.header_work is None:
            self.header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
            self.header_work = dist.irecv(self.header, self.peer)

    def receive(self, *, post_next: bool = True) -> tuple[int, list[torch.Tensor], str]:
        """The next message: ``(kind, tensors, text)``. With ``post_next`` the receive of the following
        header is posted before returning (a data message is always followed by another message)."""
        import torch.distributed as dist

        self.post_header()
        self.header_work.wait(self.timeout)
        header = self.header.cpu().tolist()
        self.header_work = self.header = None
        kind, count, text_length = header[:3]
        buffers = []
        for i in range(count):
            base = 3 + i * _SLOT
            dtype, ndim, nhwc = _DTYPES[header[base]], header[base + 1], header[base + 2]
            shape = header[base + 3:base + 3 + ndim]
            buffers.append(torch.empty(shape, dtype=dtype, device=self.device,
                                       memory_format=torch.channels_last if nhwc else torch.contiguous_format))
        text = torch.empty(text_length, dtype=torch.uint8, device=self.device) if text_length else None
        # a channels_last buffer receives into its NHWC storage
        views = [b.permute(0, 2, 3, 1) if b.dim() == 4 and not b.is_contiguous() else b for b in buffers]
        works = [dist.irecv(b, self.peer) for b in views + ([text] if text is not None else [])]
        if post_next and kind == DATA:
            self.post_header()
        for work in works:
            work.wait(self.timeout)
        return kind, buffers, ("" if text is None else bytes(text.cpu().tolist()).decode(errors="replace"))


# --- the trainer ----------------------------------------------------------------------------------------------

_FAILURE_KEY = "llkern/pipeline/failure"


class PipelineTrainer(LocalTrainer):
    """Trains a :class:`llkern.LocalNet` as a decoupled pipeline over ``torch.distributed`` processes.

    Every process builds the same net (same seed or same checkpoint) and calls the same methods; each
    trains only the modules of its stage. Rank ``s·replicas + r`` is replica ``r`` of stage ``s``.

    Args:
        net: the network; every process holds a whole copy (moved to ``device`` when given) and trains its
            stage's modules.
        stages: the number of pipeline stages S (modules spread by count), or a :class:`Placement`
            (e.g. from :func:`plan_stages`, which balances measured time).
        replicas: data-parallel replicas per stage R; default ``world_size // S``. ``S × R`` must be the
            world size.
        depth: the most micro-batches a stage keeps in flight to the next (sent but not yet received);
            default 2. Bounds the memory of messages and how far a stage runs ahead.
        device: this process's device (default: where the net's parameters are).
        timeout: seconds a stage waits for a neighbour, or for the others at the end of a pass (a long
            evaluation on the stages before an early ``eval_exit``, a checkpoint save), before giving up with a
            :class:`PipelineError`; a stage that dies is noticed at once. Default 300.
        send_image: send the input image along with the boundaries: None (default) where a later module
            reads it (a context supply, a Reconstruction loss, also inside a Composite); True for a loss of
            your own that reads ``ctx.image``, which otherwise gets None on the stages after the first.
        **options: the rest of :class:`LocalTrainer`'s options (optimizer, scheduler, precision,
            clip_grad_norm, broadcast_buffers, find_unused_parameters, measure_memory, seed).
            ``mode="sequential"`` is refused: MOLE's sequential regime trains one module at a time,
            so there is nothing to run in parallel (use :class:`LocalTrainer`).

    ``fit`` and ``evaluate`` work as in :class:`LocalTrainer` (every process calls them; only stage 0
    reads the batches, the others may pass the same data or None); ``step`` does not exist (a process
    holds a slice of many steps at once). The log rows gather every module's loss, accuracy, learning
    rate and loss scale from the stage that trains it; loss, accuracy and samples cover the global batch
    (all replicas); ``peak_saved_bytes`` and ``cuda_peak_bytes`` are the largest of any process's (the stage holding
    its largest module), and the times are this process's.

    After a :class:`PipelineError` the process group is destroyed (that is how the other stages learn
    of the failure at once): ``torch.distributed.is_initialized()`` is then False.

    ``save(path)`` writes one shard per stage (``path`` with ``.stage{s}`` before its suffix) and
    ``load(path)`` restores this stage's shard,
    refusing a checkpoint of another layout.
    """

    def __init__(self, net: LocalNet, stages: int | Placement, *, replicas: int | None = None, depth: int = 2,
                 device: torch.device | str | None = None, timeout: float = 300.0, send_image: bool | None = None,
                 **options: Any) -> None:
        import torch.distributed as dist

        if options.get("mode", "simultaneous") != "simultaneous":
            raise ValueError("PipelineTrainer: mode='sequential' trains one module at a time (MOLE's regime), so "
                             "the stages would take turns instead of running together; train it with "
                             "LocalTrainer(mode='sequential'), or use mode='simultaneous'")
        if options.get("accumulate", 1) != 1:
            raise ValueError(f"PipelineTrainer: accumulate={options['accumulate']!r} is not supported (a stage steps "
                             "after every micro-batch it receives); use LocalTrainer(accumulate=...), or a larger "
                             "batch_size with more stages to hold it")
        for name in ("distributed", "process_group"):
            if name in options:
                raise TypeError(f"PipelineTrainer: {name} is set by the pipeline (each stage's replicas form its "
                                "data-parallel group)")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"PipelineTrainer: expected depth to be an int >= 1, got {depth!r}")
        if not timeout > 0:
            raise ValueError(f"PipelineTrainer: expected timeout > 0 seconds, got {timeout!r}")
        if send_image not in (None, True, False):
            raise ValueError(f"PipelineTrainer: expected send_image to be None, True or False, got {send_image!r}")
        if not isinstance(net, LocalNet):
            raise TypeError(f"PipelineTrainer: expected net to be a llkern.LocalNet, got {type(net).__name__}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("PipelineTrainer: call torch.distributed.init_process_group first (or run under "
                               "torchrun)")
        world, rank = dist.get_world_size(), dist.get_rank()
        K = net.num_modules
        if isinstance(stages, Placement):
            placement = stages
            if replicas is not None and replicas != placement.replicas:
                raise ValueError(f"PipelineTrainer: replicas={replicas} but the placement has {placement.replicas}")
        else:
            if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
                raise ValueError(f"PipelineTrainer: expected stages to be an int >= 1 or a Placement, got {stages!r}")
            if replicas is None:
                if world % stages:
                    raise ValueError(f"PipelineTrainer: the world size {world} is not a multiple of stages={stages}")
                replicas = world // stages
            placement = Placement.balanced(K, stages, replicas=replicas) if K >= stages else None
            if placement is None:
                raise ValueError(f"PipelineTrainer: {stages} stages need at least {stages} modules (one each), the "
                                 f"net has {K}")
        if placement.num_modules != K:
            raise ValueError(f"PipelineTrainer: the placement covers {placement.num_modules} modules, the net has {K}")
        if placement.world_size != world:
            raise ValueError(f"PipelineTrainer: {placement.num_stages} stages × {placement.replicas} replicas = "
                             f"{placement.world_size} processes, but the world size is {world}")
        self.placement = placement
        self.stage, self.replica = divmod(rank, placement.replicas)
        self.global_rank = rank
        self.modules = placement.stages[self.stage]
        self.depth = depth
        self.timeout = float(timeout)
        if device is not None:
            net.to(device)  # every module, so that the whole net's state is on one device when saved
        super().__init__(net, **options)
        # LocalTrainer's data sharding among a stage's replicas: stage 0's replica r takes the r-th equal
        # share of every global batch (_train_batches)
        self.rank, self.world_size, self.distributed = self.replica, placement.replicas, placement.replicas > 1
        # What travels with a boundary: the labels always; the image where a later module reads it (a
        # context supply, a Reconstruction loss, also inside a Composite) or always with send_image=True;
        # the boundary before it for ContSup's R context.
        self._send_image = self._image_needed(self.modules.stop) if send_image is None else send_image
        self._receive_image = self._image_needed(self.modules.start) if send_image is None else send_image
        self._keep_previous = net.context is not None and "R" in net.context.mode
        # Every process must run the same layout: a placement measured on each process may differ.
        layouts: list[Any] = [None] * world
        dist.all_gather_object(layouts, (placement.to_dict(), send_image))
        if any(layout != layouts[0] for layout in layouts):
            raise ValueError(f"PipelineTrainer: the processes were given different layouts (placement, send_image): "
                             f"{layouts}; give every process rank 0's (plan_stages shares rank 0's measurement)")
        # Every process starts from rank 0's parameters, buffers and shuffling seed.
        self._source, self.process_group = 0, None
        self._broadcast([*net.parameters(), *net.buffers()])
        seed = torch.tensor([self.generator.initial_seed()], dtype=torch.int64, device=self.device)
        self._broadcast([seed])
        self.generator = torch.Generator().manual_seed(int(seed.item()))
        # Each stage's replicas form one group (every process creates every group, in the same order).
        R = placement.replicas
        groups = [dist.new_group(list(range(s * R, (s + 1) * R)), timeout=datetime.timedelta(seconds=self.timeout))
                  if R > 1 else None for s in range(placement.num_stages)]
        self.stage_group = groups[self.stage]
        self.ddp = [None] * K
        if R > 1:
            from llkern.nn.losses import MutualInformation

            unused = options.get("find_unused_parameters")
            if unused is None:
                unused = any(isinstance(net.losses[k], MutualInformation) for k in self.modules)
            for k in self.modules:
                if any(p.requires_grad for p in self.module_params[k]):
                    self.ddp[k] = module_ddp(net, k, self.stage_group, unused, options.get("broadcast_buffers", True))
        # Neighbours: replica r of the stages before and after.
        S = placement.num_stages
        self.previous_link = _Link(rank - R, self.device, depth, self.timeout) if self.stage > 0 else None
        self.next_link = _Link(rank + R, self.device, depth, self.timeout) if self.stage < S - 1 else None
        self._set_group_timeout()

    def _image_needed(self, first: int) -> bool:
        """Whether a module from ``first`` on reads the input image: a context supply, or a Reconstruction
        loss (alone or inside a Composite)."""
        from llkern.nn.losses import Reconstruction

        net = self.net
        return net.context is not None or any(isinstance(m, Reconstruction) for k in range(first, net.num_modules)
                                              for m in net.losses[k].modules())

    # --- helpers ------------------------------------------------------------------------------------------------

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.placement.num_stages - 1

    def _describe(self, rank: int | None = None) -> str:
        rank = self.global_rank if rank is None else rank
        s, r = divmod(rank, self.placement.replicas)
        return f"stage {s}" + (f" replica {r}" if self.placement.replicas > 1 else "") + f" (rank {rank})"

    def _set_group_timeout(self) -> None:
        """Use ``timeout`` for the collectives at the end of each pass too (the point-to-point waits are given
        it themselves: gloo's ignore a default changed after the process group was made)."""
        import torch.distributed as dist

        try:  # a private API: without it the process group's own timeout holds
            dist.distributed_c10d._get_default_group()._get_backend(self.device)._set_default_timeout(
                datetime.timedelta(seconds=self.timeout))
        except Exception as error:
            warnings.warn(f"PipelineTrainer: could not set the process group's timeout ({error}); the collectives "
                          "keep the one init_process_group set", stacklevel=3)

    def _store(self):
        import torch.distributed as dist

        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:
            return None

    def _fail(self, error: BaseException, who: str | None) -> PipelineError:
        """Report a failure and make it every stage's: post it to the rendezvous store (for the stages
        before this one), send it to the next stage, and close this process's connections (the stages
        next to it notice at once). ``who`` names the failed stage when it is another one."""

        if isinstance(error, PipelineError):
            return error
        store = self._store()
        if who is None:
            message = f"{self._describe()} failed: {type(error).__name__}: {error}"
        else:
            first_line = (str(error).splitlines() or [""])[0][:200]
            message = f"{who} stopped ({type(error).__name__}: {first_line}); seen by {self._describe()}"
            time.sleep(0.2)  # the stage that failed may be writing its own report: prefer that one
        if store is not None:
            # the first report wins (a replica whose all-reduce broke because another failed says the same)
            with contextlib.suppress(Exception):
                message = store.compare_set(_FAILURE_KEY, "", message).decode() or message
        self._pass_on(message)
        if self.global_rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            time.sleep(1.0)  # rank 0 hosts the store here: let the other stages read the report first
        return PipelineError(f"PipelineTrainer: {message}")

    def _pass_on(self, message: str) -> None:
        """Send a failure report to the next stage (two seconds at most for the report itself, after the
        messages already in flight) and close this process's connections, so that the stages next to it
        stop waiting at once."""
        import torch.distributed as dist

        if self.next_link is not None:
            with contextlib.suppress(Exception):
                self.next_link.send(FAILED, text=message)
                for work in self.next_link.pending[-1][0]:
                    work.wait(datetime.timedelta(seconds=2))
        with contextlib.suppress(Exception):
            dist.destroy_process_group()

    def _receive(self, *, post_next: bool = True) -> tuple[int, list[torch.Tensor]]:
        try:
            kind, tensors, text = self.previous_link.receive(post_next=post_next)
        except Exception as error:
            raise self._fail(error, self._describe(self.global_rank - self.placement.replicas)) from error
        if kind == FAILED:
            self._pass_on(text)
            raise PipelineError(f"PipelineTrainer: {text}")
        return kind, tensors

    def _send(self, kind: int, tensors: Sequence[torch.Tensor] = ()) -> None:
        _Link.check(tensors)  # this stage's own error, not its neighbour's
        try:
            self.next_link.send(kind, tensors)
        except Exception as error:
            raise self._fail(error, self._describe(self.global_rank + self.placement.replicas)) from error

    def _flush(self) -> None:
        if self.next_link is not None:
            try:
                self.next_link.flush()
            except Exception as error:
                raise self._fail(error, self._describe(self.global_rank + self.placement.replicas)) from error

    def _collective(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except PipelineError:
            raise
        except Exception as error:
            raise self._fail(error, "a stage") from error

    # --- training -----------------------------------------------------------------------------------------------

    def end_epoch(self) -> None:
        """Count an epoch as done; step the epoch-interval schedulers of this stage's modules."""
        if self.scheduler_interval == "epoch":
            for k in self.modules:
                if self.schedulers[k] is not None:
                    self.schedulers[k].step()
        self.epoch += 1

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        raise TypeError("PipelineTrainer has no step(): each process holds a slice of several steps at once; "
                        "call fit(), or LocalTrainer.step for one step in one process")

    def _stage_step(self, h: torch.Tensor, previous: torch.Tensor | None, image: torch.Tensor | None,
                    target: torch.Tensor, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This stage's modules on one micro-batch, as :meth:`LocalNet.local_step` runs them; adds each
        module's loss and accuracy (times the batch) to ``sums``. Returns (output, the boundary before it)."""
        net = self.net
        n = target.shape[0]
        autocast = self._autocast_dtype()
        before = previous
        for k in self.modules:
            if k <= 1 or not self._keep_previous:
                previous_k = image
            else:
                previous_k = before
            wrapper = self.ddp[k]
            if wrapper is not None:
                out, result = wrapper(h, image, previous_k, target, autocast)
            else:
                out, result = net._module_step(k, h, image, previous_k, target, autocast)
            self._backward(k, result.loss)
            sums[0, k] += result.loss.detach().double() * n
            accuracy = _accuracy(result, target)
            if accuracy is not None:
                sums[1, k] += accuracy.double() * n
                sums[2, k] += n
            del result, previous_k
            before, h = h, out.detach()
            del out
            self._after_backward(k)
        return h, before

    def _message(self, h: torch.Tensor, before: torch.Tensor | None, image: torch.Tensor | None,
                 target: torch.Tensor) -> list[torch.Tensor]:
        tensors = [h, target]
        if self._send_image:
            tensors.append(image)
        if self._keep_previous and self.modules.stop >= 2:
            tensors.append(before)  # the last module's input: boundary stop − 2
        return tensors

    def _unpack(self, tensors: list[torch.Tensor]) -> tuple:
        h, target = tensors[0], tensors[1]
        rest = tensors[2:]
        image = rest.pop(0) if self._receive_image else None
        previous = rest.pop(0) if self._keep_previous and self.modules.start >= 2 else None
        return h, previous, image, target

    def _stage_inputs(self, data: Any, batch_size: int, shuffle: bool, progress: str | None,
                      transform: Callable | None) -> Iterator[tuple]:
        """This stage's micro-batches of a pass, as ``(h, previous, image, target)``: stage 0 reads them
        from ``data`` (its replica's share), the others receive them until the end of the pass."""
        from tqdm import tqdm

        if not self.is_first:
            while True:
                kind, tensors = self._receive()
                if kind == END:
                    return
                yield self._unpack(tensors)
        if data is None:
            raise ValueError("PipelineTrainer.fit: stage 0 reads the training data; got data=None")
        batches, total = self._train_batches(data, batch_size, shuffle)
        for xb, yb in tqdm(batches, total=total, desc=progress, leave=False, disable=progress is None):
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
            if transform is not None:
                xb = transform(xb)
            if len(yb) == 0:
                raise ValueError("PipelineTrainer.fit: expected non-empty batches, got an empty one")
            image = xb.detach()
            yield image, None, image, yb

    def _train_pass(self, data: Any, batch_size: int, shuffle: bool, progress: str | None,
                    transform: Callable | None) -> tuple[torch.Tensor, int]:
        """One epoch on this stage: returns the sums (loss·n, accuracy·n, n with accuracy, per module;
        the sample count in the last column) and the number of micro-batches."""
        K = self.num_modules
        sums = torch.zeros(5, K + 1, dtype=torch.float64, device=self.device)  # rows 3-4: lr, loss scale
        steps = 0
        for k in self.modules:  # gradients left by the caller would be added to the first step's
            self.optimizers[k].zero_grad(set_to_none=True)
        for h, previous, image, target in self._stage_inputs(data, batch_size, shuffle, progress, transform):
            h, before = self._stage_step(h, previous, image, target, sums)
            sums[2, K] += len(target)
            steps += 1
            self.global_step += 1
            if self.next_link is not None:
                self._send(DATA, self._message(h, before, image, target))
        if self.is_first and steps == 0:
            raise ValueError("PipelineTrainer.fit: the training data gave no batch")
        if self.next_link is not None:
            self._send(END)
        self._flush()
        return sums, steps

    def fit(self, data: Batches | tuple[torch.Tensor, torch.Tensor] | None, epochs: int | None = None, *,
            batch_size: int = 64, shuffle: bool = True, eval_data: Any = None, eval_exit: int | str = -1,
            progress: bool = True, log: Any = None, checkpoint: str | os.PathLike[str] | None = None,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[dict]:
        """Train until ``epochs`` epochs are done in total, as :meth:`LocalTrainer.fit` (same arguments and
        rows). Stage 0 reads ``data`` (``(x, y)`` tensors: each replica takes its share of every global
        batch of ``batch_size``; or an iterable of batches: give each replica its shard); the other stages
        ignore it. ``checkpoint`` is a path from which each stage's shard path is made (see :meth:`save`)."""
        from llkern.local.logs import check_log_path, write_log
        from llkern.local.memory import MemoryMeter

        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"PipelineTrainer.fit: expected epochs to be an int >= 1, got {epochs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PipelineTrainer.fit: expected batch_size to be an int >= 1, got {batch_size!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"PipelineTrainer.fit: expected transform to be callable, got {type(transform).__name__}")
        K = self.num_modules
        if eval_exit != "all" and (isinstance(eval_exit, bool) or not isinstance(eval_exit, int)
                                   or not -K <= eval_exit < K):
            raise IndexError(f"PipelineTrainer.fit: eval_exit={eval_exit!r} is out of range for {K} modules")
        sinks = [] if log is None else list(log) if isinstance(log, (list, tuple)) else [log]
        for sink in sinks:
            if not callable(sink):
                check_log_path(sink)
        lead = self.global_rank == 0
        K = self.num_modules
        _make_output_folders(sinks, checkpoint, lead)  # (every stage writes its shard next to the checkpoint)
        self._use_transform(transform)
        try:
            while self.epoch < epochs:
                _advance_sampler(data, self.epoch)
                self.net.train()
                meter = MemoryMeter(exclude=self.net.parameters()) if self.measure_memory else None
                started = time.perf_counter()
                desc = f"epoch {self.epoch + 1}/{epochs}" if progress and lead else None
                with meter if meter is not None else contextlib.nullcontext():
                    sums, steps = self._train_pass(data, batch_size, shuffle, desc, transform)
                epoch_time = time.perf_counter() - started
                self.end_epoch()
                if self.replica == 0:  # each module's learning rate and loss scale, from the stage that owns it
                    for k in self.modules:
                        sums[3, k] = self.optimizers[k].param_groups[0]["lr"]
                        if self.scalers[k] is not None:
                            sums[4, k] = self.scalers[k].get_scale()
                # every module's sums from its stage (replicas add up: the row covers the global batch)
                self._collective(lambda s=sums: torch.distributed.all_reduce(s))
                counts = torch.tensor([steps], dtype=torch.int64, device=self.device)
                self._collective(lambda c=counts: torch.distributed.broadcast(c, src=0))
                # the memory peaks of the process that holds the most (what a per-process budget is about); -1: none
                peaks = torch.tensor([-1 if meter is None else meter.peak_saved_bytes,
                                      -1 if meter is None or meter.cuda_peak_bytes is None else meter.cuda_peak_bytes],
                                     dtype=torch.int64, device=self.device)
                self._collective(lambda p=peaks: torch.distributed.all_reduce(p, torch.distributed.ReduceOp.MAX))
                saved_peak, cuda_peak = (int(v) if v >= 0 else None for v in peaks.tolist())
                sums = sums.cpu()
                samples = int(sums[2, K]) // self.placement.num_stages
                row: dict[str, Any] = {
                    "epoch": self.epoch, "mode": self.mode, "active_module": None,
                    "steps": int(counts.item()), "samples": samples,
                    "loss": [float(sums[0, k] / samples) for k in range(K)],
                    "accuracy": [float(sums[1, k] / sums[2, k]) if sums[2, k] > 0 else None for k in range(K)],
                    "lr": [float(sums[3, k]) for k in range(K)],
                    "loss_scale": [float(sums[4, k]) for k in range(K)] if self.precision == "fp16" else None,
                    "step_time_s": epoch_time / max(steps, 1),
                    "epoch_time_s": epoch_time,
                    "peak_saved_bytes": saved_peak,
                    "cuda_peak_bytes": cuda_peak,
                    "eval_loss": None, "eval_accuracy": None,
                }
                evaluated = self._evaluate_data(eval_data, eval_exit)
                if evaluated is not None:
                    row["eval_loss"], row["eval_accuracy"] = evaluated["loss"], evaluated["accuracy"]
                self.history.append(row)
                if lead:
                    for sink in sinks:
                        sink(row) if callable(sink) else write_log(self.history, sink)
                if checkpoint is not None and self.replica == 0:
                    self.save(checkpoint)
        except PipelineError:
            raise
        except Exception as error:
            raise self._fail(error, None) from error
        return self.history

    def _evaluate_data(self, eval_data: Any, exit: int | str) -> dict | None:
        """Evaluate after an epoch. Stage 0 tells the others whether there is evaluation data."""
        flag = torch.tensor([0 if eval_data is None else 1], device=self.device)
        self._collective(lambda: torch.distributed.broadcast(flag, src=0))
        if not flag.item():
            return None
        if isinstance(eval_data, (tuple, list)) and len(eval_data) == 2 and isinstance(eval_data[0], torch.Tensor):
            return self.evaluate(eval_data[0], eval_data[1], exit=exit)
        return self.evaluate(eval_data, exit=exit)

    # --- evaluation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, x: Any = None, y: torch.Tensor | None = None, *, exit: int | str = -1, batch_size: int = 512,
                 ignore_index: int = -100) -> dict[str, Any]:
        """Loss and accuracy of head ``exit`` (the last by default, or ``"all"``) through the pipeline:
        stage 0 reads ``x, y`` (as :meth:`LocalTrainer.evaluate`; the replicas of stage 0 take every
        R-th batch), every stage runs its modules forward, and the stage holding a head scores it. Every
        process gets the result."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PipelineTrainer.evaluate: expected batch_size to be an int >= 1, got {batch_size!r}")
        every = exit == "all"
        K = self.num_modules
        if not every:
            if isinstance(exit, bool) or not isinstance(exit, int) or not -K <= exit < K:
                raise IndexError(f"PipelineTrainer.evaluate: exit={exit!r} is out of range for {K} modules")
            exits = {exit % K}
        else:
            exits = set(range(K))
        was_training = self.net.training
        self.net.eval()
        sums = torch.zeros(2, K + 1, dtype=torch.float64)  # loss sum, correct; counted samples at [0, K]
        autocast = self._autocast_dtype()
        net = self.net
        last_needed = max(exits)
        needed = self.modules.start <= last_needed  # this stage runs
        send_on = self.next_link is not None and self.modules.stop <= last_needed  # and so does the next

        def score(k: int, h: torch.Tensor, target: torch.Tensor) -> None:
            logits = net.heads[k](h).float().reshape(target.shape[0], -1)
            counted = target.reshape(-1) != ignore_index
            t = target.reshape(-1)
            sums[0, k] += F.cross_entropy(logits, t, reduction="sum", ignore_index=ignore_index).item()
            sums[1, k] += ((logits.argmax(dim=-1) == t) & counted).sum().item()

        def run(h, previous, image, target):
            for k in self.modules:
                with (torch.autocast(self.device.type, dtype=autocast) if autocast is not None
                      else contextlib.nullcontext()):
                    h, previous = net.blocks[k](net._module_input(k, h, image, previous)), h
                    if k in exits:
                        score(k, h, target)
            return h, previous

        try:
            if self.is_first:
                if x is None:
                    raise ValueError("PipelineTrainer.evaluate: stage 0 reads the evaluation data; got x=None")
                batches = self._eval_batches(x, y, batch_size)
                for i, (xb, yb) in enumerate(batches):
                    if i % self.placement.replicas != self.replica:
                        continue
                    xb, yb = xb.to(self.device), yb.to(self.device)
                    sums[0, K] += int((yb.reshape(-1) != ignore_index).sum())
                    h, before = run(xb, xb, xb, yb)
                    if send_on:
                        self._send(DATA, self._message(h, before, xb, yb))
                if send_on:
                    self._send(END)
            elif needed:
                while True:
                    kind, tensors = self._receive()
                    if kind == END:
                        break
                    h, previous, image, target = self._unpack(tensors)
                    h, before = run(h, image if previous is None else previous, image, target)
                    if send_on:
                        self._send(DATA, self._message(h, before, image, target))
                if send_on:
                    self._send(END)
            self._flush()
        except PipelineError:
            raise
        except Exception as error:
            raise self._fail(error, None) from error
        finally:
            self.net.train(was_training)
        total = sums.to(self.device)
        self._collective(lambda: torch.distributed.all_reduce(total))
        total = total.cpu()
        count = int(total[0, K])
        if count == 0:
            raise ValueError("PipelineTrainer.evaluate: expected a non-empty evaluation set (with at least one "
                             f"target other than ignore_index={ignore_index})")
        loss = [float(total[0, k] / count) for k in range(K)]
        accuracy = [float(total[1, k] / count) for k in range(K)]
        if every:
            return {"loss": loss, "accuracy": accuracy}
        k = exit % K
        return {"loss": loss[k], "accuracy": accuracy[k]}

    # --- checkpoints --------------------------------------------------------------------------------------------

    def shard_path(self, path: str | os.PathLike[str], stage: int | None = None) -> Path:
        """Where stage ``stage``'s shard of checkpoint ``path`` goes: ``run.pt`` → ``run.stage1.pt``."""
        path = Path(path)
        s = self.stage if stage is None else stage
        return path.with_name(f"{path.stem}.stage{s}{path.suffix}")

    def _stage_parameters(self) -> dict[str, torch.Tensor]:
        owned = {id(p) for k in self.modules for part in self.module_parts[k] for p in part.parameters()}
        owned |= {id(b) for k in self.modules for part in self.module_parts[k] for b in part.buffers()}
        return {name: t for name, t in self.net.state_dict(keep_vars=True).items() if id(t) in owned}

    def state_dict(self) -> dict[str, Any]:
        """This stage's shard: its modules' parameters and buffers, their optimizers, schedulers and
        scalers, the counters, the history, the generator and RNG states, and the layout."""
        state = super().state_dict()
        keep = set(self.modules)
        state["net"] = {name: t.detach() for name, t in self._stage_parameters().items()}
        for key in ("optimizers", "schedulers", "scalers"):
            state[key] = [s if k in keep else None for k, s in enumerate(state[key])]
        state["pipeline"] = {**self.placement.to_dict(), "stage": self.stage}
        return state

    def _check_shard(self, state: dict[str, Any]) -> None:
        layout = state.get("pipeline")
        mine = {**self.placement.to_dict(), "stage": self.stage}
        if layout is None:
            raise ValueError("the checkpoint was not written by a PipelineTrainer (no layout)")
        if layout != mine:
            raise ValueError(f"the checkpoint's layout {layout} does not match this run's {mine}; resume with the same "
                             "stages, replicas and module placement")
        self._check_state(state)
        missing = sorted(set(self._stage_parameters()) - set(state["net"]))
        if missing:
            raise ValueError(f"the checkpoint lacks {missing[:3]}")

    def load_state_dict(self, state: dict[str, Any], *, restore_rng: bool = True) -> None:
        """Restore this stage's shard (:meth:`state_dict`); refuses one of another layout or trainer."""
        try:
            self._check_shard(state)
        except ValueError as error:
            raise ValueError(f"PipelineTrainer: {error}") from None
        with torch.no_grad():
            for name, t in self._stage_parameters().items():
                t.copy_(state["net"][name])
        self._load_module_states(state, self.modules)
        self._load_counters(state)
        if restore_rng:
            _restore_rng(state["rng"])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this stage's shard to :meth:`shard_path` (replica 0 of each stage writes; replicas are equal)."""
        super().save(self.shard_path(path))

    def load(self, path: str | os.PathLike[str], *, restore_rng: bool = True) -> PipelineTrainer:
        """Restore this stage's shard of checkpoint ``path`` (every process loads; replicas read replica 0's
        file, so the shards must be on a file system they share). All processes check together: a missing
        shard, another layout, or shards of different epochs (a run stopped between two stages' saves)
        raise the same ``ValueError`` on every process."""
        import torch.distributed as dist

        shard = self.shard_path(path)
        state, problem = None, None
        try:
            if not shard.exists():
                others = sorted(Path(path).parent.glob(f"{Path(path).stem}.stage*{Path(path).suffix}"))
                raise ValueError(f"no shard {shard}; the checkpoint has {len(others)} stage shard(s), this run has "
                                 f"{self.placement.num_stages} stages")
            state = self._read_checkpoint(shard)
            self._check_shard(state)
        except Exception as error:
            problem = f"{self._describe()}: {error}"
        seen: list[Any] = [None] * dist.get_world_size()
        position = None if state is None else (int(state["epoch"]), int(state["global_step"]))
        dist.all_gather_object(seen, (problem, position))
        problems = [p for p, _ in seen if p]
        if problems:
            raise ValueError("PipelineTrainer.load: " + "; ".join(problems))
        if len({pos for _, pos in seen}) > 1:
            raise ValueError("PipelineTrainer.load: the shards are from different points of the run (epoch, step "
                             f"by rank: {[pos for _, pos in seen]}); the run stopped between two stages' saves")
        self.load_state_dict(state, restore_rng=restore_rng)
        return self


def read_shards(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Join the stage shards of a :class:`PipelineTrainer` checkpoint ``path`` (``run.pt`` →
    ``run.stage0.pt``, ``run.stage1.pt``, ...) into one: the whole net's ``"net"`` state, and stage 0's
    counters, history and metadata. For evaluating or exporting a pipeline-trained net in one process
    (``net.load_state_dict(read_shards(path)["net"])``); resuming a pipeline loads the shards themselves."""
    path = Path(path)
    first = torch.load(path.with_name(f"{path.stem}.stage0{path.suffix}"), map_location="cpu", weights_only=True)
    layout = first.get("pipeline")
    if layout is None:
        raise ValueError(f"read_shards: {path} is not a PipelineTrainer checkpoint")
    merged = dict(first)
    merged["net"] = dict(first["net"])
    for s in range(1, len(layout["stages"])):
        shard = path.with_name(f"{path.stem}.stage{s}{path.suffix}")
        if not shard.is_file():
            raise ValueError(f"read_shards: the checkpoint has {len(layout['stages'])} stages, {shard} is missing")
        state = torch.load(shard, map_location="cpu", weights_only=True)
        if state.get("pipeline", {}).get("stages") != layout["stages"] or state["epoch"] != first["epoch"]:
            raise ValueError(f"read_shards: {shard} is from another run or epoch than stage 0's shard")
        merged["net"].update(state["net"])
    return merged
