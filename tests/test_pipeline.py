"""PipelineTrainer: decoupled pipeline training over real torch.distributed (gloo) processes.

The pipeline trains the same parameters as one process running LocalTrainer: module k's input at
step t is module k−1's output from step t's forward in both. The tests compare them bitwise after
two epochs (CPU, one thread per process), for cross-entropy, TRGL, and ContSup's E and R contexts, on
2 and 3 processes, and with 2 replicas per stage against data-parallel LocalTrainer. Then failures: a
stage that raises or is killed makes the others stop with an error naming it, and bad layouts are
refused before any message.
"""
import datetime
import os
import shutil
import signal
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import llkern
from llkern.local.pipeline import PipelineError, PipelineTrainer, Placement, module_costs, plan_stages
from llkern.local.trainer import LocalTrainer
from llkern.models import digits_resnet
from llkern.nn.losses import Composite, CrossEntropy, LocalLoss, Reconstruction, TransportRegularized

from .distributed import file_init_method

EPOCHS, BATCH, SEED = 2, 16, 1234


def net_for(case, seed=0, num_modules=4):
    torch.manual_seed(seed)
    blocks = digits_resnet(num_modules, width=4)
    example = torch.randn(2, 1, 8, 8)
    if case == "recon":  # a Reconstruction inside a Composite: the image must travel to every stage
        decoder = llkern.reconstruction_decoders(example.shape[1:])
        shapes = llkern.nn.heads.feature_shapes(blocks, example)
        losses = lambda k, K: Composite([CrossEntropy(), (Reconstruction(decoder(k, shapes[k])), 0.5)])  # noqa: E731
    options = {"ce": {}, "trgl": {"losses": lambda k, K: TransportRegularized(tau=1.0)},
               "contsup_e": {"context": "E"}, "contsup_r": {"context": "R"},
               "recon": {"losses": losses if case == "recon" else None}, "channels_last": {}}[case]
    net = llkern.LocalNet(blocks, num_classes=10, example_input=example, **options)
    if case == "channels_last":  # boundaries travel in NHWC and arrive channels_last
        net = net.to(memory_format=torch.channels_last)
    if net.context is not None:
        net.context.impl = "reference"  # not Triton's interpreter: the same sums, and seconds instead of minutes
    return net


def data(n=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def halving(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def launch(worker, world, *args, timeout=90):
    """Start ``world`` forked processes running ``worker(rank, world, init_method, *args)``; wait for all of them
    (a process that dies does not stop the others: the pipeline must do that itself). Their process group meets
    through a file store in a temporary folder, removed once they are done (a killed process leaves its file)."""
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with tempfile.TemporaryDirectory() as folder:
        init_method = file_init_method(folder)
        processes = [context.Process(target=worker, args=(rank, world, init_method, *args)) for rank in range(world)]
        for p in processes:
            p.start()
        deadline = time.monotonic() + timeout
        for p in processes:
            p.join(max(0.1, deadline - time.monotonic()))
        alive = [p for p in processes if p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
    assert not alive, f"processes still running after {timeout} s (a hang)"
    return [p.exitcode for p in processes]


def _init(rank, world, init_method, timeout=60):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def _train_cases(rank, world, init_method, stages, cases, out_dir):
    _init(rank, world, init_method)
    x, y = data()
    results = {}
    try:
        for case in cases:
            # every process builds its own copy with a different seed: the trainer broadcasts rank 0's
            net = net_for(case, seed=rank)
            trainer = PipelineTrainer(net, stages, optimizer=sgd, scheduler=halving, seed=SEED)
            rows = trainer.fit((x, y), EPOCHS, batch_size=BATCH, eval_data=(x[:40], y[:40]), progress=False)
            owned = {name for name, _ in trainer._stage_parameters().items()}
            results[case] = {"state": {k: v for k, v in net.state_dict().items() if k in owned}, "rows": rows,
                             "every": trainer.evaluate(x[:40], y[:40], exit="all")}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def reference(case):
    """The single-process LocalTrainer run the pipeline must reproduce."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = data()
        net = net_for(case, seed=0)
        trainer = LocalTrainer(net, optimizer=sgd, scheduler=halving, seed=SEED)
        rows = trainer.fit((x, y), EPOCHS, batch_size=BATCH, eval_data=(x[:40], y[:40]), progress=False)
        return net.state_dict(), rows, trainer.evaluate(x[:40], y[:40], exit="all")
    finally:
        torch.set_num_threads(threads)


def check_against_reference(tmp_path, world, cases):
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for case in cases:
        state, rows, every = reference(case)
        seen = set()
        for r in range(world):
            for name, value in ranks[r][case]["state"].items():
                assert torch.equal(value, state[name]), (case, name, r)
                seen.add(name)
        trained = {n for n, v in state.items() if v.is_floating_point()}
        assert trained <= seen, (case, trained - seen)  # every parameter and statistic was owned by a stage
        got = ranks[0][case]["rows"]
        assert [r["eval_accuracy"] for r in got] == [r["eval_accuracy"] for r in rows], case
        for mine, theirs in zip(got, rows, strict=True):
            assert mine["samples"] == theirs["samples"] and mine["steps"] == theirs["steps"]
            assert mine["lr"] == theirs["lr"]  # every module's, after the epoch's scheduler step
            torch.testing.assert_close(mine["loss"], theirs["loss"], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(mine["accuracy"], theirs["accuracy"], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(mine["eval_loss"], theirs["eval_loss"], rtol=1e-12, atol=1e-12)
        for r in range(world):  # every process gets the gathered evaluation
            assert ranks[r][case]["every"]["accuracy"] == every["accuracy"], (case, r)
            torch.testing.assert_close(ranks[r][case]["every"]["loss"], every["loss"], rtol=1e-12, atol=1e-12)


CASES = ("ce", "trgl", "contsup_e", "contsup_r", "recon", "channels_last")


@pytest.mark.parametrize("world", [2, 3])
def test_pipeline_trains_the_same_parameters_as_one_process(tmp_path, world):
    codes = launch(_train_cases, world, world, CASES, str(tmp_path))
    assert codes == [0] * world
    check_against_reference(tmp_path, world, CASES)


def _resume_worker(rank, world, init_method, out_dir):
    """One epoch with a checkpoint; fresh trainers (other initialisations) resume it and train the second."""
    _init(rank, world, init_method)
    x, y = data()
    try:
        trainer = PipelineTrainer(net_for("contsup_r", seed=rank), world, optimizer=sgd, scheduler=halving,
                                  seed=SEED)
        trainer.fit((x, y), 1, batch_size=BATCH, eval_data=(x[:40], y[:40]), progress=False,
                    checkpoint=os.path.join(out_dir, "run.pt"))
        net = net_for("contsup_r", seed=10 + rank)
        resumed = PipelineTrainer(net, world, optimizer=sgd, scheduler=halving, seed=SEED + 1).load(
            os.path.join(out_dir, "run.pt"))
        rows = resumed.fit((x, y), EPOCHS, batch_size=BATCH, eval_data=(x[:40], y[:40]), progress=False)
        owned = set(resumed._stage_parameters())
        result = {"contsup_r": {"state": {k: v.clone() for k, v in net.state_dict().items() if k in owned},
                                "rows": list(rows),
                                "every": resumed.evaluate(x[:40], y[:40], exit="all")}}
        # shards of different epochs (a run stopped between two stages' saves) are refused on every process
        resumed.fit((x, y), EPOCHS + 1, batch_size=BATCH, progress=False, checkpoint=os.path.join(out_dir, "old.pt"))
        if rank == 1:  # stage 1's shard from epoch 1 beside stage 0's from epoch 3
            shutil.copy(os.path.join(out_dir, "run.stage1.pt"), os.path.join(out_dir, "old.stage1.pt"))
        try:
            PipelineTrainer(net_for("contsup_r"), world, optimizer=sgd, scheduler=halving).load(
                os.path.join(out_dir, "old.pt"))
            result["mixed"] = "loaded"
        except ValueError as error:
            result["mixed"] = str(error)
        # different placements on different processes are refused on every process
        placement = Placement((range(0, 2), range(2, 4))) if rank == 0 else Placement((range(0, 1), range(1, 4)))
        try:
            PipelineTrainer(net_for("ce"), placement)
            result["placements"] = "accepted"
        except ValueError as error:
            result["placements"] = str(error)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_resume_from_stage_shards_continues_the_same_run(tmp_path):
    assert launch(_resume_worker, 2, str(tmp_path)) == [0, 0]
    assert sorted(p.name for p in tmp_path.glob("run.*")) == ["run.stage0.pt", "run.stage1.pt"]
    check_against_reference(tmp_path, 2, ["contsup_r"])  # the parameters of the uninterrupted two-epoch run
    for r in range(2):
        result = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert "different points of the run" in result["mixed"] and "[(3, 15), (1, 5)]" in result["mixed"], result
        assert "different layouts" in result["placements"], result


# --- replicas ------------------------------------------------------------------------------------------------


def _replica_worker(rank, world, init_method, out_dir):
    """Ranks 0-3: 2 stages × 2 replicas. Then ranks 0-1 alone: data-parallel LocalTrainer, the reference."""
    _init(rank, world, init_method)
    x, y = data()
    try:
        net = net_for("contsup_r", seed=rank)
        trainer = PipelineTrainer(net, 2, replicas=2, optimizer=sgd, seed=SEED)
        rows = trainer.fit((x, y), EPOCHS, batch_size=BATCH, eval_data=(x[:40], y[:40]), progress=False)
        owned = set(trainer._stage_parameters())
        result = {"state": {k: v for k, v in net.state_dict().items() if k in owned}, "rows": rows,
                  "kinds": [w is not None for w in trainer.ddp]}
        pair = dist.new_group([0, 1])
        if rank < 2:
            net = net_for("contsup_r", seed=rank)
            trainer = LocalTrainer(net, optimizer=sgd, seed=SEED, distributed=True, process_group=pair)
            trainer.fit((x, y), EPOCHS, batch_size=BATCH, progress=False)
            result["reference"] = net.state_dict()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_replicas_per_stage_match_data_parallel_training(tmp_path):
    assert launch(_replica_worker, 4, str(tmp_path)) == [0] * 4
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    # stage 0 is ranks 0-1 (modules 0-1), stage 1 ranks 2-3 (modules 2-3), each module under its own DDP
    assert ranks[0]["kinds"] == [True, True, False, False] and ranks[3]["kinds"] == [False, False, True, True]
    reference = ranks[0]["reference"]
    for name, _ in net_for("contsup_r").named_parameters():  # the data-parallel replicas agree
        assert torch.equal(reference[name], ranks[1]["reference"][name]), name
    for r in range(4):
        assert ranks[r]["state"], r
        for name, value in ranks[r]["state"].items():
            if "running" in name or "num_batches" in name:
                continue  # BatchNorm statistics are each replica's own (as with DDP)
            assert torch.equal(value, reference[name]), (name, r)
    assert ranks[0]["rows"][-1]["samples"] == len(data()[1]) - len(data()[1]) % 2


# --- failures -------------------------------------------------------------------------------------------------


class FailingLoss(LocalLoss):
    """Cross-entropy that, on one rank, raises (or kills its process) at its third call."""

    def __init__(self, rank, how):
        super().__init__()
        self.task, self.rank, self.how, self.calls = CrossEntropy(), rank, how, 0

    def forward(self, ctx):
        self.calls += 1
        if dist.get_rank() == self.rank and self.calls == 3:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "hang":
                time.sleep(12)  # longer than the pipeline's timeout
                return self.task(ctx)
            raise ValueError("boom in the loss")
        return self.task(ctx)


def _failing_worker(rank, world, init_method, victim, how, out_dir, timeout=20):
    _init(rank, world, init_method, timeout=30)
    torch.manual_seed(0)
    net = llkern.LocalNet(digits_resnet(3, width=4), num_classes=10, example_input=torch.randn(2, 1, 8, 8),
                          losses=lambda k, K: FailingLoss(victim, how))
    x, y = data(200)
    started = time.monotonic()
    try:
        PipelineTrainer(net, 3, optimizer=sgd, timeout=timeout).fit((x, y), 3, batch_size=8, progress=False)
        message = "finished"
    except PipelineError as error:
        message = str(error)
    except Exception:
        message = "other: " + traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{time.monotonic() - started:.1f}\n{message}")
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("victim", [1, 2])
def test_a_stage_that_raises_stops_every_stage_with_its_error(tmp_path, victim):
    launch(_failing_worker, 3, victim, "raise", str(tmp_path), timeout=60)
    for rank in range(3):
        seconds, message = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
        assert f"stage {victim} (rank {victim}) failed: ValueError: boom in the loss" in message, (rank, message)
        assert float(seconds) < 20


def test_a_killed_stage_stops_the_others_with_an_error_naming_it(tmp_path):
    codes = launch(_failing_worker, 3, 1, "kill", str(tmp_path), timeout=60)
    assert codes[1] == -signal.SIGKILL
    assert not (tmp_path / "rank1.txt").exists()
    for rank in (0, 2):
        seconds, message = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
        assert "stage 1 (rank 1) stopped" in message, (rank, message)
        assert float(seconds) < 20


@pytest.mark.slow  # waits out a 12 s sleep
def test_a_stage_that_hangs_is_given_up_after_the_timeout(tmp_path):
    launch(_failing_worker, 3, 1, "hang", str(tmp_path), 3, timeout=60)
    for rank in (0, 2):
        seconds, message = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
        assert "stage 1 (rank 1) stopped" in message, (rank, message)
        assert 2 < float(seconds) < 11, (rank, seconds)  # the timeout (3 s), not the 12 s sleep


# --- layouts, in one process --------------------------------------------------------------------------------


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=file_init_method(tmp_path))
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_bad_layouts_are_refused_before_any_message(world_of_one):
    net = net_for("ce")
    with pytest.raises(ValueError, match=r"2 stages × 1 replicas = 2 processes, but the world size is 1"):
        PipelineTrainer(net, Placement((range(0, 2), range(2, 4))))
    with pytest.raises(ValueError, match="world size 1 is not a multiple of stages=2"):
        PipelineTrainer(net, 2)
    with pytest.raises(ValueError, match="5 stages need at least 5 modules"):
        PipelineTrainer(net, 5, replicas=1)
    with pytest.raises(ValueError, match="stage 1 has no module"):
        Placement((range(0, 4), range(4, 4)))
    with pytest.raises(ValueError, match="stage 1 starts at module 3, expected 2"):
        Placement((range(0, 2), range(3, 4)))
    with pytest.raises(ValueError, match="covers 3 modules, the net has 4"):
        PipelineTrainer(net, Placement((range(0, 3),)))
    with pytest.raises(ValueError, match="sequential"):
        PipelineTrainer(net, 1, mode="sequential")
    with pytest.raises(ValueError, match="depth"):
        PipelineTrainer(net, 1, depth=0)
    with pytest.raises(TypeError, match="distributed is set by the pipeline"):
        PipelineTrainer(net, 1, distributed=True)
    with pytest.raises(TypeError, match="no step"):
        PipelineTrainer(net, 1).step(*data(4))


def test_fit_checks_before_training(world_of_one):
    x, y = data()
    trainer = PipelineTrainer(net_for("ce"), 1, optimizer=sgd)
    with pytest.raises(IndexError, match="eval_exit=7"):
        trainer.fit((x, y), 1, eval_data=(x, y), eval_exit=7, progress=False)
    assert trainer.epoch == 0
    with pytest.raises(PipelineError, match=r"stage 0 \(rank 0\) failed: ValueError: .*gave no batch"):
        trainer.fit((x[:0], y[:0]), 1, progress=False)
    assert not dist.is_initialized()  # a failure closes the process group (how the other stages learn of it)


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        PipelineTrainer(net_for("ce"), 1)


def test_one_stage_is_local_training(world_of_one, tmp_path):
    """A one-stage pipeline is LocalTrainer; its checkpoint round-trips and refuses another layout."""
    x, y = data()
    net = net_for("contsup_r")
    trainer = PipelineTrainer(net, 1, optimizer=sgd, seed=SEED)
    rows = trainer.fit((x, y), 1, batch_size=BATCH, progress=False, checkpoint=tmp_path / "run.pt")
    state, _, _ = reference_one_epoch("contsup_r")
    for name, value in net.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert rows[0]["eval_accuracy"] is None and rows[0]["samples"] == len(y)
    assert (tmp_path / "run.stage0.pt").exists()
    # resume: a fresh trainer loads the shard and continues to the same place as an uninterrupted run
    resumed = PipelineTrainer(net_for("contsup_r", seed=5), 1, optimizer=sgd, seed=SEED).load(tmp_path / "run.pt")
    assert resumed.epoch == 1
    for name, value in resumed.net.state_dict().items():
        assert torch.equal(value, state[name]), name
    blob = torch.load(tmp_path / "run.stage0.pt", weights_only=True)
    blob["pipeline"]["stages"] = [[0, 2], [2, 4]]
    torch.save(blob, tmp_path / "other.stage0.pt")
    with pytest.raises(ValueError, match="layout"):
        PipelineTrainer(net_for("contsup_r"), 1, optimizer=sgd).load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no shard"):
        PipelineTrainer(net_for("contsup_r"), 1, optimizer=sgd).load(tmp_path / "missing.pt")


def reference_one_epoch(case):
    x, y = data()
    net = net_for(case, seed=0)
    trainer = LocalTrainer(net, optimizer=sgd, seed=SEED)
    rows = trainer.fit((x, y), 1, batch_size=BATCH, progress=False)
    return net.state_dict(), rows, None


# --- placement ------------------------------------------------------------------------------------------------


def test_placement_balances_costs():
    assert Placement.balanced(4, 2).stages == (range(0, 2), range(2, 4))
    assert Placement.balanced(5, 2, costs=[1, 1, 1, 1, 4]).stages == (range(0, 4), range(4, 5))
    assert Placement.balanced(3, 3).world_size == 3 and Placement.balanced(4, 2, replicas=3).world_size == 6
    assert str(Placement.balanced(5, 2, costs=[4, 1, 1, 1, 1])) == "stage 0: module 0; stage 1: modules 1-4"
    with pytest.raises(ValueError, match="expected 4 costs"):
        Placement.balanced(4, 2, costs=[1, 2, 3])
    with pytest.raises(ValueError, match="finite costs"):
        Placement.balanced(2, 2, costs=[1, float("nan")])


def test_plan_stages_by_measured_time_and_bytes():
    torch.manual_seed(0)
    # module 0 is much heavier than the others: alone on its stage
    from torch import nn
    blocks = [nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())]
    blocks += [nn.Sequential(nn.Conv2d(64 if k == 0 else 4, 4, 1), nn.ReLU()) for k in range(3)]
    net = llkern.LocalNet(blocks, num_classes=10, example_input=torch.randn(2, 1, 8, 8))
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    costs = module_costs(net, x, y, repeats=2)
    assert len(costs) == 4 and costs[0] > sum(costs[1:])
    assert all(p.grad is None for p in net.parameters())
    assert plan_stages(net, 2, x, y).stages == (range(0, 1), range(1, 4))
    assert plan_stages(net, 2, x, y, by="saved_bytes").stages == (range(0, 1), range(1, 4))
    assert plan_stages(net, 2, by="count").stages == (range(0, 2), range(2, 4))
    with pytest.raises(ValueError, match="give x and y"):
        plan_stages(net, 2)
    with pytest.raises(ValueError, match="by="):
        module_costs(net, x, y, by="flops")
