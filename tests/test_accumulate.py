"""LocalTrainer(accumulate=N): N batches' gradients per optimizer step are the step of one N-times larger batch
(simultaneous and sequential modes, momentum, Adam, per-step schedules, clipping, fp16, two gloo processes); a
smaller batch counts by its samples; an epoch's shorter last group steps at the epoch's end; pending gradients are
never lost silently, and a step that raises leaves no part of its batch behind."""

import datetime
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import llkern
from llkern.local.pipeline import PipelineTrainer
from llkern.local.trainer import LocalTrainer

from .distributed import file_init_method
from .test_trainer import fp16_supported


def plain_net(seed=0, dtype=torch.float64):
    """Three conv modules without BatchNorm (whose batch statistics would differ between batch sizes)."""
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())]
    return llkern.LocalNet(blocks, num_classes=10, example_input=torch.randn(2, 1, 8, 8)).to(dtype)


def data(n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def params(net):
    return [p.detach().clone() for p in net.parameters()]


def assert_same(a, b, **tolerance):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **tolerance)


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["simultaneous", "sequential"])
def test_fit_with_accumulated_batches_equals_fit_with_one_larger_batch(optimizer, mode):
    # 200 samples: three groups of 4 × 16, then a last group of one batch of 8 (stepped at the epoch's end),
    # against batches of 64, 64, 64 and 8 in the same shuffled order (same seed)
    x, y = data(200)
    runs = {}
    for accumulate, batch_size in ((4, 16), (1, 64)):
        net = plain_net()
        trainer = LocalTrainer(net, mode=mode, optimizer=OPTIMIZERS[optimizer], accumulate=accumulate, seed=3,
                               scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.9),
                               scheduler_interval="step", clip_grad_norm=5.0, measure_memory=False)
        rows = trainer.fit((x, y), epochs=3, batch_size=batch_size, progress=False)
        runs[accumulate] = (params(net), rows, trainer)
    assert_same(runs[4][0], runs[1][0], rtol=1e-9, atol=1e-12)
    assert [r["lr"] for r in runs[4][1]] == [r["lr"] for r in runs[1][1]]  # as many scheduler steps
    assert runs[4][1][-1]["steps"] == 13 and runs[1][1][-1]["steps"] == 4  # steps count batches
    assert runs[4][2].global_step == 39
    assert not all(torch.equal(a, b) for a, b in zip(runs[4][0], params(plain_net()), strict=True))  # it trained


def test_steps_before_the_group_ends_change_nothing_and_flush_applies_the_mean():
    x, y = data(48, seed=1)
    net, reference = plain_net(), plain_net()
    trainer = LocalTrainer(net, optimizer=OPTIMIZERS["sgd-momentum"], accumulate=3)
    start = params(net)
    trainer.step(x[:16], y[:16])
    trainer.step(x[16:32], y[16:32])
    assert_same(params(net), start, rtol=0, atol=0)  # accumulated, not applied
    with pytest.raises(RuntimeError, match=r"2 batch\(es\) of gradients are accumulated.*flush\(\)"):
        trainer.state_dict()
    trainer.flush()  # two batches of a group of three: their mean, as one step on the 32 samples
    LocalTrainer(reference, optimizer=OPTIMIZERS["sgd-momentum"]).step(x[:32], y[:32])
    assert_same(params(net), params(reference), rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in net.parameters())
    flushed = params(net)
    trainer.flush()  # nothing pending: nothing happens
    assert_same(params(net), flushed, rtol=0, atol=0)
    trainer.state_dict()  # nothing pending: a checkpoint can be written
    # a full group steps by itself, on its third batch
    for start in (0, 16):
        trainer.step(x[start:start + 16], y[start:start + 16])
    before = params(net)
    trainer.step(x[32:], y[32:])
    assert not all(torch.equal(a, b) for a, b in zip(before, params(net), strict=True))
    assert trainer._pending == 0


def test_end_epoch_applies_the_pending_group_and_load_discards_it(tmp_path):
    x, y = data(32, seed=2)
    net = plain_net()
    trainer = LocalTrainer(net, optimizer=OPTIMIZERS["adam"], accumulate=4)
    trainer.save(tmp_path / "start.pt")
    start = params(net)
    trainer.step(x[:16], y[:16])
    trainer.end_epoch()
    assert not all(torch.equal(a, b) for a, b in zip(start, params(net), strict=True))
    trainer.step(x[16:], y[16:])
    trainer.load(tmp_path / "start.pt")  # the pending batch belonged to the replaced state
    assert trainer._pending == 0 and all(p.grad is None for p in net.parameters())
    assert_same(params(net), start, rtol=0, atol=0)


def test_a_smaller_batch_counts_by_its_samples():
    # 184 samples in batches of 16: the epoch's last group is 16, 16, 8 (flushed at the epoch's end), against
    # batches of 64, 64 and 56: the 8 samples count as 8 of 40, not as a third of the group
    x, y = data(184)
    runs = []
    for accumulate, batch_size in ((4, 16), (1, 64)):
        net = plain_net()
        trainer = LocalTrainer(net, optimizer=OPTIMIZERS["sgd-momentum"], accumulate=accumulate, seed=3,
                               measure_memory=False)
        trainer.fit((x, y), epochs=2, batch_size=batch_size, progress=False)
        runs.append(params(net))
    assert_same(runs[0], runs[1], rtol=1e-9, atol=1e-12)
    # a full group of unequal batches (driven by hand): 8 + 24 + 16 samples, one step on the 48
    net, reference = plain_net(), plain_net()
    trainer = LocalTrainer(net, optimizer=OPTIMIZERS["adam"], accumulate=3)
    for start, stop in ((0, 8), (8, 32), (32, 48)):
        trainer.step(x[start:stop], y[start:stop])
    LocalTrainer(reference, optimizer=OPTIMIZERS["adam"]).step(x[:48], y[:48])
    assert_same(params(net), params(reference), rtol=1e-9, atol=1e-12)


class _Fails(nn.Module):
    """Identity, or an error while ``armed`` (a batch that fails in module 1, after module 0's backward)."""

    armed = False

    def forward(self, h):
        if self.armed:
            raise RuntimeError("this batch fails")
        return h


def test_a_step_that_raises_drops_the_group():
    # the failing batch's gradient in module 0 (whose backward ran) must not reach a later step; the group it
    # was in is dropped, and the next batches form a new one
    x, y = data(80, seed=6)
    nets = [plain_net(), plain_net()]
    for net in nets:
        net.blocks[1].append(_Fails())
    trainer, reference = (LocalTrainer(net, optimizer=OPTIMIZERS["sgd-momentum"], accumulate=3) for net in nets)
    trainer.step(x[:16], y[:16])
    nets[0].blocks[1][-1].armed = True
    with pytest.raises(RuntimeError, match="this batch fails"):
        trainer.step(x[16:32], y[16:32])
    nets[0].blocks[1][-1].armed = False
    assert trainer._pending == 0 and all(p.grad is None for p in nets[0].parameters())
    trainer.state_dict()  # nothing pending
    for start in (32, 48, 64):
        trainer.step(x[start:start + 16], y[start:start + 16])
        reference.step(x[start:start + 16], y[start:start + 16])
    assert_same(params(nets[0]), params(nets[1]), rtol=0, atol=0)


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "2", None])
def test_accumulate_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="expected accumulate to be an int >= 1"):
        LocalTrainer(plain_net(), accumulate=value)


def test_pipeline_refuses_accumulate():
    with pytest.raises(ValueError, match="accumulate=2 is not supported"):
        PipelineTrainer(plain_net(), 2, accumulate=2)


@pytest.mark.skipif(not fp16_supported(), reason="this torch has no float16 autocast or GradScaler on the CPU")
def test_fp16_accumulation_unscales_once_per_step():
    # float16 autocast with a gradient scaler: the scaled gradients of the two batches add up, are unscaled once
    # and step once; within float16's rounding the same as one step on both batches
    x, y = data(64, seed=4, dtype=torch.float32)
    results = []
    for accumulate, batch_size in ((2, 16), (1, 32)):
        net = plain_net(dtype=torch.float32)
        trainer = LocalTrainer(net, optimizer=OPTIMIZERS["sgd-momentum"], precision="fp16", accumulate=accumulate)
        for start in range(0, 64, batch_size):
            trainer.step(x[start:start + batch_size], y[start:start + batch_size])
        results.append((params(net), [s.get_scale() for s in trainer.scalers]))
    start = params(plain_net(dtype=torch.float32))
    for a, b, s in zip(results[0][0], results[1][0], start, strict=True):
        # the update agrees to float16's precision (relative to the update, not to the weights)
        assert (a - b).abs().max() <= 2e-2 * (b - s).abs().max() + 1e-6
    assert results[0][1] == results[1][1]  # no overflow: the scales never halved


# --- two gloo processes -------------------------------------------------------------------------------------------

SHARD = 8


class _GatedHead(nn.Module):
    """Mean-pool and linear, plus a bias used only while ``gated`` is set: a parameter whose use depends on the
    process and the batch (DDP's find_unused_parameters)."""

    def __init__(self, channels, classes):
        super().__init__()
        self.linear = nn.Linear(channels, classes)
        self.bias = nn.Parameter(torch.zeros(classes))
        self.gated = True

    def forward(self, h):
        out = self.linear(h.mean(dim=(2, 3)))
        return out + self.bias if self.gated else out


def gated_net(seed=0):
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())]
    return llkern.LocalNet(blocks, heads=[_GatedHead(6, 10), _GatedHead(8, 10)]).to(torch.float64)


def _shards(x, y, rank, world, steps, sizes=None):
    """Process ``rank``'s batches: the rank-th SHARD samples of each global batch (``sizes[step]`` of some)."""
    for s in range(steps):
        start = s * world * SHARD + rank * SHARD
        stop = start + (sizes or {}).get(s, SHARD)
        yield x[start:stop], y[start:stop]


def _worker(rank, world, init_method, case, x, y, out_dir):
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        net = (gated_net if case == "gated" else plain_net)(seed=rank)  # rank 0's parameters are broadcast
        trainer = LocalTrainer(net, distributed=True, optimizer=OPTIMIZERS["sgd-momentum"], accumulate=2,
                               find_unused_parameters=case == "gated")
        # five steps of a global batch of world × SHARD: groups of two, then one batch flushed at end_epoch
        # ("uneven": process 1's fourth batch, the second group's last, is smaller; "gated": process 1 uses the
        # heads' bias in no batch)
        sizes = {3: SHARD - 3} if case == "uneven" and rank == 1 else None
        for xb, yb in _shards(x, y, rank, world, 5, sizes):
            if case == "gated":
                for head in net.heads:
                    head.gated = rank == 0
            trainer.step(xb, yb)
        trainer.end_epoch()
        torch.save(params(net), os.path.join(out_dir, f"rank{rank}.pt"))
        # the DDPs hold the process group: freed after destroy_process_group, as the worker returned, one process
        # hung now and then once the other had exited; free them first, and leave together
        del trainer
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo(case, x, y, out_dir, world=2):
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    init_method = file_init_method(out_dir)
    mp.start_processes(_worker, args=(world, init_method, case, x, y, str(out_dir)), nprocs=world, join=True,
                       start_method=start_method)
    replicas = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]
    assert_same(replicas[0], replicas[1], rtol=0, atol=0)
    return replicas[0]


def test_two_gloo_processes_accumulate_as_one_process_on_the_whole_batches(tmp_path):
    world = 2
    x, y = data(5 * world * SHARD, seed=5)
    replica = run_gloo("plain", x, y, tmp_path, world)
    # one process: two steps on the first 2 × 2 shards each, then one on the last 2 shards
    net = plain_net(seed=0)
    trainer = LocalTrainer(net, optimizer=OPTIMIZERS["sgd-momentum"])
    group = 2 * world * SHARD
    for start in (0, group):
        trainer.step(x[start:start + group], y[start:start + group])
    trainer.step(x[2 * group:], y[2 * group:])
    assert_same(replica, params(net), rtol=1e-9, atol=1e-12)


def test_two_gloo_processes_flush_a_parameter_only_one_process_used(tmp_path):
    # the last group (one batch, flushed at end_epoch) gives the heads' bias a gradient on process 0 only: the
    # processes must still send the same messages (it crashed gloo: 280 bytes against 264), and process 1
    # counts zeros for it, as DDP does within a group. One process, accumulate=4 over the shards in order:
    # the same mean over the shard means
    world = 2
    x, y = data(5 * world * SHARD, seed=7)
    replica = run_gloo("gated", x, y, tmp_path, world)
    net = gated_net(seed=0)
    trainer = LocalTrainer(net, optimizer=OPTIMIZERS["sgd-momentum"], accumulate=2 * world)
    shards = [list(_shards(x, y, rank, world, 5)) for rank in range(world)]
    for s in range(5):
        for rank in range(world):
            for head in net.heads:
                head.gated = rank == 0
            trainer.step(*shards[rank][s])
    trainer.end_epoch()
    assert_same(replica, params(net), rtol=1e-9, atol=1e-12)


def test_two_gloo_processes_stay_equal_with_batches_of_other_sizes(tmp_path):
    # process 1's fourth batch is smaller: each process weighs its batches by their samples before the all-reduce
    # (a factor taken after it would differ between the processes and part the replicas)
    x, y = data(5 * 2 * SHARD, seed=8)
    run_gloo("uneven", x, y, tmp_path)
