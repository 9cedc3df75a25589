"""LocalTrainer: modes, per-module optimizers and schedules, precision, clipping, data parallel (2 gloo
processes), fit logs, evaluation, checkpoints and resume, and the digits accuracy of local training."""

import csv
import datetime
import json
import math
import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import llkern
from llkern.local.trainer import LocalTrainer, module_parameters, module_parts
from llkern.models import digits_resnet
from llkern.nn.losses import CrossEntropy, LocalLoss

from .distributed import file_init_method


def small_net(num_modules=3, width=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    return llkern.LocalNet(digits_resnet(num_modules, width=width), num_classes=10,
                           example_input=torch.randn(2, 1, 8, 8), **kwargs)


def plain_net(seed=0):
    """Three conv modules without BatchNorm: data-parallel runs are exactly a big-batch run."""
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())]
    return llkern.LocalNet(blocks, num_classes=10, example_input=torch.randn(2, 1, 8, 8))


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def first_conv(net, k):
    return next(m for m in net.blocks[k].modules() if isinstance(m, nn.Conv2d))


def snapshot(modules):
    return [t.detach().clone() for m in modules for t in [*m.parameters(), *m.buffers()]]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def sgd(lr=0.1, momentum=0.0):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


# --- simultaneous mode and per-module optimizers ------------------------------------------------------------------

def test_module_parameters_cover_the_net_once():
    net = small_net(context="RE")
    groups = module_parameters(net)
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))
    assert {id(p) for p in net.context.image_encoders[1].parameters()} <= {id(p) for p in groups[2]}
    assert {id(p) for p in net.context.previous_encoders[0].parameters()} <= {id(p) for p in groups[1]}
    assert module_parts(net, 0) == [net.blocks[0], net.heads[0], net.losses[0]]


def test_simultaneous_step_equals_local_step_then_one_optimizer():
    x, y = data()
    reference = small_net()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    net = small_net()
    trainer = LocalTrainer(net, optimizer=sgd(0.1, 0.9))
    for _ in range(3):
        optimizer.zero_grad()
        expected = reference.local_step(x, y)
        optimizer.step()
        got = trainer.step(x, y)
        assert got.losses == pytest.approx(expected.losses, rel=1e-6)
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert all(p.grad is None for p in net.parameters())  # each module's gradients were freed after its step
    assert trainer.global_step == 3


def test_module_k_is_stepped_and_its_gradients_freed_before_module_k_plus_1_runs():
    net = small_net()
    before = [snapshot([net.blocks[k], net.heads[k]]) for k in range(3)]
    seen = {}

    class Probe(LocalLoss):
        def forward(self, ctx):
            if ctx.k > 0:
                earlier = list(net.blocks[ctx.k - 1].parameters()) + list(net.heads[ctx.k - 1].parameters())
                current = list(net.blocks[ctx.k].parameters())
                seen[ctx.k] = (all(p.grad is None for p in earlier),
                               not same(before[ctx.k - 1][:len(earlier)], [p.detach() for p in earlier]),
                               same(before[ctx.k][:len(current)], [p.detach() for p in current]))
            return CrossEntropy()(ctx)

    net.losses = nn.ModuleList([Probe() for _ in range(3)])
    LocalTrainer(net, optimizer=sgd()).step(*data())
    # When module k runs: module k-1's gradients are gone, its parameters updated, module k's not yet.
    assert seen == {1: (True, True, True), 2: (True, True, True)}


def test_per_module_optimizer_factories_and_schedulers():
    net = small_net()
    trainer = LocalTrainer(net, optimizer=[sgd(0.1), sgd(0.2), sgd(0.3)],
                           scheduler=[lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5), None,
                                      lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.1)])
    assert [len(o.param_groups[0]["params"]) for o in trainer.optimizers] == [len(g) for g in module_parameters(net)]
    rows = trainer.fit(data(), epochs=2, batch_size=16, progress=False)
    assert rows[0]["lr"] == pytest.approx([0.05, 0.2, 0.03])
    assert rows[1]["lr"] == pytest.approx([0.025, 0.2, 0.003])
    per_step = LocalTrainer(small_net(), optimizer=sgd(1.0), scheduler_interval="step",
                            scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5))
    per_step.fit(data(), epochs=1, batch_size=16, progress=False)
    assert [o.param_groups[0]["lr"] for o in per_step.optimizers] == pytest.approx([0.125] * 3)  # 3 steps


# --- sequential mode ----------------------------------------------------------------------------------------------

def test_local_step_modules_argument():
    net = small_net()
    calls = []
    for k in range(3):  # on a layer: LocalNet runs a block's children itself, bypassing the block's hooks
        first_conv(net, k).register_forward_hook(lambda m, i, o, k=k: calls.append((k, torch.is_grad_enabled())))
    x, y = data(16)
    result = net.local_step(x, y, modules=1)
    assert calls == [(0, False), (1, True)]  # module 0 forward only, module 2 not run
    assert result.losses[0] is None and result.losses[2] is None and result.losses[1] > 0
    assert result.accuracies[0] is None and result.terms[0] == {} and len(result.boundaries) == 2
    assert all(p.grad is None for k in (0, 2) for p in [*net.blocks[k].parameters(), *net.heads[k].parameters()])
    assert all(p.grad is not None for p in net.blocks[1].parameters())
    calls.clear()
    assert net.local_step(x, y, modules=[0, -1]).losses[1] is None
    assert calls == [(0, True), (1, False), (2, True)]
    with pytest.raises(IndexError, match="out of range"):
        net.local_step(x, y, modules=3)
    with pytest.raises(ValueError, match="at least one module"):
        net.local_step(x, y, modules=[])


def test_sequential_trains_one_module_at_a_time_and_freezes_the_earlier_ones():
    net = small_net()
    modes_seen = []

    class Probe(LocalLoss):
        def forward(self, ctx):
            modes_seen.append((ctx.k, [net.blocks[j].training for j in range(3)]))
            return CrossEntropy()(ctx)

    net.losses = nn.ModuleList([Probe() for _ in range(3)])
    trainer = LocalTrainer(net, mode="sequential", epochs_per_module=[1, 2, 1], optimizer=sgd(0.1, 0.9))
    states = [[snapshot(module_parts(net, k)) for k in range(3)]]
    frozen = []  # per epoch, which modules' parameters stopped requiring gradients

    def log(row):
        states.append([snapshot(module_parts(net, k)) for k in range(3)])
        frozen.append([not any(p.requires_grad for p in module_parameters(net)[k]) for k in range(3)])

    rows = trainer.fit(data(), batch_size=16, progress=False, log=log)
    assert [r["active_module"] for r in rows] == [0, 1, 1, 2] and trainer.epoch == trainer.total_epochs == 4
    phase = [0, 1, 1, 2]
    for epoch in range(4):
        for k in range(3):
            changed = not same(states[epoch][k], states[epoch + 1][k])
            # parameters and BatchNorm statistics change only in the module's own phase
            assert changed == (phase[epoch] == k), (epoch, k)
    for k, loss in zip(phase, [r["loss"] for r in rows], strict=True):
        assert [v is not None for v in loss] == [j == k for j in range(3)]
    assert {k for k, _ in modes_seen} == {0, 1, 2}
    for k, training in modes_seen:  # frozen modules in eval mode, the active one in train mode
        assert training[:k + 1] == [False] * k + [True]
    assert frozen == [[False] * 3, [True, False, False], [True, False, False], [True, True, False]]
    # fit gives every parameter back its requires_grad: the net trains in other ways afterwards
    assert all(p.requires_grad for p in net.parameters())
    net.local_step(*data(16))
    assert trainer.optimizers[0].state == {} and trainer.optimizers[2].state != {}  # frozen: momentum dropped
    with pytest.raises(ValueError, match="sum\\(epochs_per_module\\) = 4"):
        trainer.fit(data(), epochs=5, progress=False)


def test_sequential_mode_keeps_what_the_caller_froze():
    # A frozen (pretrained) layer stays frozen and unchanged through the phases and after fit.
    net = small_net()
    trainer = LocalTrainer(net, mode="sequential", epochs_per_module=1, optimizer=sgd(0.1, 0.9))
    pretrained = first_conv(net, 1)
    pretrained.requires_grad_(False)  # (after the trainer was built: what counts is the setting fit finds)
    before = snapshot([pretrained])
    trainer.fit(data(), 2, batch_size=16, progress=False)
    assert all(p.requires_grad for p in first_conv(net, 0).parameters())
    trainer.load_state_dict(trainer.state_dict())  # a load in the middle of the run keeps the setting too
    trainer.fit(data(), 3, batch_size=16, progress=False)
    assert same(before, snapshot([pretrained])) and not any(p.requires_grad for p in pretrained.parameters())
    assert all(p.requires_grad for p in first_conv(net, 0).parameters())


# --- precision ----------------------------------------------------------------------------------------------------

def test_bf16_runs_modules_under_autocast_and_heads_in_float32():
    net = small_net()
    dtypes = []
    first_conv(net, 1).register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    head_dtypes = []

    class Probe(LocalLoss):
        def forward(self, ctx):
            head_dtypes.append(ctx.outputs.dtype)
            return CrossEntropy()(ctx)

    net.losses = nn.ModuleList([Probe() for _ in range(3)])
    trainer = LocalTrainer(net, precision="bf16", optimizer=sgd(0.05))
    x, y = data(32)
    first = trainer.step(x, y).losses
    for _ in range(5):
        last = trainer.step(x, y).losses
    assert dtypes[0] == torch.bfloat16 and set(head_dtypes) == {torch.float32}
    assert all(math.isfinite(v) for v in last) and sum(last) < sum(first)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    evaluated = trainer.evaluate(x, y, exit="all")
    assert len(evaluated["accuracy"]) == 3 and all(0 <= a <= 1 for a in evaluated["accuracy"])


def fp16_supported():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = nn.Conv2d(1, 2, 3)(torch.randn(1, 1, 4, 4))
        torch.amp.GradScaler("cpu")
        return out.dtype == torch.float16
    except (RuntimeError, AttributeError, TypeError):
        return False


@pytest.mark.skipif(not fp16_supported(), reason="this torch has no float16 autocast or GradScaler on the CPU")
def test_fp16_overflow_skips_only_the_overflowing_module_step():
    net = small_net()
    overflow = {"on": True}

    class Overflow(LocalLoss):
        def forward(self, ctx):
            out = CrossEntropy()(ctx)
            if ctx.k == 1 and overflow["on"]:
                out.loss = out.loss * float("inf")
            return out

    net.losses = nn.ModuleList([Overflow() for _ in range(3)])
    trainer = LocalTrainer(net, precision="fp16", optimizer=sgd(0.05))
    before = [snapshot([net.blocks[k]]) for k in range(3)]
    trainer.step(*data(16))
    after = [snapshot([net.blocks[k]]) for k in range(3)]
    params = [len(list(net.blocks[k].parameters())) for k in range(3)]
    changed = [not same(before[k][:params[k]], after[k][:params[k]]) for k in range(3)]
    assert changed == [True, False, True]
    scales = [s.get_scale() for s in trainer.scalers]
    assert scales[1] == scales[0] / 2 == 2.0 ** 15
    overflow["on"] = False
    trainer.step(*data(16))
    assert not same(after[1][:params[1]], snapshot([net.blocks[1]])[:params[1]])  # trains once finite again


# --- clipping -----------------------------------------------------------------------------------------------------

def test_gradient_clipping_bounds_each_module_norm():
    norms = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
            return super().step(closure)

    bound = 0.05
    trainer = LocalTrainer(small_net(), optimizer=lambda p: Recording(p, lr=0.1), clip_grad_norm=bound)
    trainer.step(*data())
    assert len(norms) == 3
    assert all(n <= bound * (1 + 1e-5) for n in norms)
    assert all(n.item() > bound for n in trainer.grad_norms)  # the bound was active: the raw norms exceeded it


# --- data parallel ------------------------------------------------------------------------------------------------

STEPS, SHARD = 4, 16


def mi_net(seed=0):
    """MOLE's losses: the heads of modules 0 and 1 are unused, so DDP needs find_unused_parameters."""
    return small_net(seed=seed, losses=lambda k, K: llkern.MutualInformation())


def _ddp_worker(rank, world, init_method, x, y, out_dir):
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    # a short timeout: a collective left unpaired fails the test in a minute instead of hanging it
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        # Different initialisations per rank: the trainer broadcasts rank 0's parameters.
        results, kinds = {}, {}
        cases = (("plain", plain_net(seed=rank), {}), ("bn", small_net(seed=rank), {}),
                 ("sequential", small_net(seed=rank), {"mode": "sequential"}),
                 ("mi", mi_net(seed=rank), {}))  # find_unused_parameters: on by default for MI
        for name, net, options in cases:
            trainer = LocalTrainer(net, distributed=True, optimizer=sgd(0.1, 0.9), **options)
            for s in range(STEPS):
                batch = slice(s * world * SHARD + rank * SHARD, s * world * SHARD + (rank + 1) * SHARD)
                trainer.step(x[batch], y[batch])
                if name == "sequential" and s % 2 == 1:
                    trainer.end_epoch()  # modules 0 then 1, two steps each
            results[name] = net.state_dict()
            kinds[name] = [isinstance(w, DistributedDataParallel) for w in trainer.ddp]
        results["kinds"] = kinds
        # a process whose shard has no labelled sample still reduces zero gradients with the others
        net = mi_net(seed=rank)
        trainer = LocalTrainer(net, distributed=True, optimizer=sgd(0.1))
        for s in range(2):
            target = y[:SHARD] if rank == 0 or s == 0 else torch.full_like(y[:SHARD], -100)
            trainer.step(x[:SHARD], target)
        results["unlabelled"] = net.state_dict()
        # with find_unused_parameters=False, unused heads are named as the cause at the next step (on every rank)
        trainer = LocalTrainer(mi_net(seed=rank), distributed=True, optimizer=sgd(), find_unused_parameters=False)
        trainer.step(x[:SHARD], y[:SHARD])
        try:
            trainer.step(x[:SHARD], y[:SHARD])
            results["unused_error"] = ""
        except RuntimeError as error:
            results["unused_error"] = str(error)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # the DDPs hold the process group: freed before it is destroyed, with both processes still there
        del trainer, net
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_data_parallel_two_gloo_processes_match_one_process_on_the_whole_batch(tmp_path):
    world = 2
    x, y = data(STEPS * world * SHARD)
    # fork where there is one: the children inherit the imported modules instead of importing torch again
    # (they run one thread each, so the parent's OpenMP pool is never needed after the fork)
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    init_method = file_init_method(tmp_path)
    mp.start_processes(_ddp_worker, args=(world, init_method, x, y, str(tmp_path)), nprocs=world, join=True,
                       start_method=start_method)
    replicas = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    # every module ran under its own DistributedDataParallel
    assert all("find_unused_parameters=True" in replica["unused_error"] for replica in replicas)
    assert all(replica["kinds"][name] == [True] * 3 for replica in replicas for name in replica["kinds"])
    nets = {"plain": plain_net(), "bn": small_net(), "sequential": small_net(), "mi": mi_net(),
            "unlabelled": mi_net()}
    for name, net in nets.items():  # the replicas' parameters stay identical: BatchNorm, sequential, unused heads
        for key, _ in net.named_parameters():
            assert torch.equal(replicas[0][name][key], replicas[1][name][key]), (name, key)
    # sequential: module 2 was never trained, modules 0 and 1 were
    for key, value in small_net(seed=0).named_parameters():
        if key.startswith("blocks."):
            assert torch.equal(replicas[0]["sequential"][key], value) == key.startswith("blocks.2."), key
    # BatchNorm's running statistics come from each process's shard, as with DDP: equal at the start of
    # a step (rank 0's are broadcast), different after it.
    # Without BatchNorm (whose batch statistics are per process) the averaged gradients are those of
    # one process on the concatenated batch: the same parameters up to float rounding.
    net = plain_net(seed=0)
    trainer = LocalTrainer(net, optimizer=sgd(0.1, 0.9))
    for s in range(STEPS):
        trainer.step(x[s * world * SHARD:(s + 1) * world * SHARD], y[s * world * SHARD:(s + 1) * world * SHARD])
    for key, value in net.state_dict().items():
        torch.testing.assert_close(replicas[0]["plain"][key], value, rtol=1e-5, atol=1e-6)


def test_module_step_wraps_exactly_one_module_and_gives_the_same_step():
    from llkern.local.net import ModuleStep

    nets = [small_net(context="RE"), small_net(context="RE")]
    steps = [ModuleStep(nets[1], k) for k in range(3)]
    for k, step in enumerate(steps):  # module k's parts, and no other parameter of the net
        expected = {id(p) for part in nets[1].module_parts(k) for p in part.parameters()}
        assert {id(p) for p in step.parameters()} == expected
    x, y = data(16)
    plain = nets[0].local_step(x, y)
    wrapped = nets[1].local_step(x, y, wrappers=steps)
    assert plain.losses == wrapped.losses
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    with pytest.raises(ValueError, match="expected 3 wrappers"):
        nets[1].local_step(x, y, wrappers=steps[:2])
    with pytest.raises(IndexError, match="out of range"):
        ModuleStep(nets[1], 3)


def test_distributed_refuses_graph_models(tmp_path):
    import torch.distributed as dist

    from llkern.models import gcn_nodes
    from llkern.nn.graph import Graph, normalized_adjacency

    graph = Graph(normalized_adjacency(torch.tensor([[0, 1, 2], [1, 2, 3]]), 4))
    model = gcn_nodes(graph, 3, 2, hidden=4, depth=2)
    net = llkern.LocalNet([model[0], model[1]], num_classes=2, example_input=torch.randn(4, 3))
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=file_init_method(tmp_path))
    try:
        with pytest.raises(ValueError, match="graph models"):
            LocalTrainer(net, distributed=True)
    finally:
        dist.destroy_process_group()


def test_distributed_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        LocalTrainer(small_net(), distributed=True)


# --- fit, logs, evaluation, resume --------------------------------------------------------------------------------

def test_fit_rows_and_logs(tmp_path):
    x, y = data(40)
    seen = []
    trainer = LocalTrainer(small_net(), optimizer=sgd(0.05))
    rows = trainer.fit((x, y), epochs=2, batch_size=16, eval_data=(x[:20], y[:20]), progress=False, log=seen.append)
    assert seen == rows and len(rows) == 2 and json.loads(json.dumps(rows)) == rows
    row = rows[-1]
    assert row["epoch"] == 2 and row["steps"] == 3 and row["samples"] == 40 and row["mode"] == "simultaneous"
    assert len(row["loss"]) == len(row["accuracy"]) == len(row["lr"]) == 3
    assert all(v > 0 for v in row["loss"]) and all(0 <= a <= 1 for a in row["accuracy"])
    assert row["peak_saved_bytes"] > 0 and row["step_time_s"] > 0 and row["epoch_time_s"] >= row["step_time_s"]
    assert row["eval_accuracy"] == pytest.approx(trainer.evaluate(x[:20], y[:20])["accuracy"])
    for suffix in ("json", "jsonl", "csv"):
        trainer = LocalTrainer(small_net(), optimizer=sgd(0.05))
        path = tmp_path / f"log.{suffix}"
        rows = trainer.fit((x, y), epochs=2, batch_size=16, progress=True, log=path)
        text = path.read_text()
        if suffix == "json":
            assert json.loads(text) == rows
        elif suffix == "jsonl":
            assert [json.loads(line) for line in text.splitlines()] == rows
        else:
            table = list(csv.DictReader(text.splitlines()))
            assert len(table) == 2 and float(table[1]["loss_2"]) == pytest.approx(rows[1]["loss"][2])
            assert table[0]["eval_accuracy"] == ""
    with pytest.raises(ValueError, match=r"\.json, \.jsonl or \.csv"):
        LocalTrainer(small_net()).fit((x, y), epochs=1, progress=False, log=tmp_path / "log.txt")


def test_fit_on_a_dataloader_and_evaluate_exits():
    x, y = data(40)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    trainer = LocalTrainer(small_net(), optimizer=sgd(0.05))
    rows = trainer.fit(loader, epochs=1, eval_data=loader, eval_exit="all", progress=False)
    assert rows[0]["steps"] == 3 and len(rows[0]["eval_accuracy"]) == 3
    trainer.net.eval()
    evaluated = trainer.evaluate(x, y, exit=1, batch_size=7)
    assert not trainer.net.training  # the mode is restored
    with torch.no_grad():
        logits = trainer.net(x, exit=1)
    assert evaluated["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert evaluated["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    # unlabelled samples (ignore_index) count in neither the loss nor the accuracy
    partial = y.clone()
    partial[::3] = -100
    keep = partial != -100
    evaluated = trainer.evaluate([(x, partial)], exit=1)
    assert evaluated["accuracy"] == pytest.approx((logits.argmax(1) == y)[keep].float().mean().item())
    assert evaluated["loss"] == pytest.approx(nn.functional.cross_entropy(logits[keep], y[keep]).item(), rel=1e-5)
    with pytest.raises(ValueError, match="ignore_index"):
        trainer.evaluate([(x, torch.full_like(y, -100))])


@pytest.mark.parametrize("mode", ["simultaneous", "sequential"])
def test_resume_gives_the_parameters_of_an_uninterrupted_run(tmp_path, mode):
    x, y = data(48)
    steps = 3

    def make(seed=0):
        # momentum, a per-step schedule, dropout (RNG) and shuffling all carry state across the break
        net = small_net(seed=seed)
        net.heads = nn.ModuleList([nn.Sequential(nn.Dropout(0.2), head) for head in net.heads])
        return LocalTrainer(net, mode=mode, epochs_per_module=[1, 2, 1], optimizer=sgd(0.1, 0.9),
                            scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, total_steps=4 * steps),
                            scheduler_interval="step", seed=5)

    torch.manual_seed(123)
    full = make()
    full.fit((x, y), epochs=4, batch_size=16, progress=False)
    torch.manual_seed(123)
    first = make()
    first.fit((x, y), epochs=2, batch_size=16, progress=False, checkpoint=tmp_path / "ckpt.pt")
    resumed = make(seed=7).load(tmp_path / "ckpt.pt")  # a fresh net with other weights: all comes from the file
    assert resumed.epoch == 2 and len(resumed.history) == 2
    rows = resumed.fit((x, y), epochs=4, batch_size=16, progress=False)
    for p, q in zip(resumed.net.state_dict().values(), full.net.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert [r["loss"] for r in rows] == [r["loss"] for r in full.history]


def test_checkpoint_mismatch_and_construction_errors(tmp_path):
    trainer = LocalTrainer(small_net())
    trainer.save(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="mode='simultaneous'"):
        LocalTrainer(small_net(), mode="sequential").load(tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="mode"):
        LocalTrainer(small_net(), mode="parallel")
    with pytest.raises(ValueError, match="precision"):
        LocalTrainer(small_net(), precision="fp8")
    with pytest.raises(ValueError, match="clip_grad_norm"):
        LocalTrainer(small_net(), clip_grad_norm=0.0)
    with pytest.raises(ValueError, match="3 optimizers"):
        LocalTrainer(small_net(), optimizer=[sgd(), sgd()])
    with pytest.raises(ValueError, match="example_input"):
        LocalTrainer(llkern.LocalNet(digits_resnet(2, width=4), num_classes=10))
    with pytest.raises(TypeError, match="LocalNet"):
        LocalTrainer(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="give epochs"):
        trainer.fit(data(), progress=False)


# --- accuracy on digits -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_digits_local_k4_within_two_points_of_end_to_end():
    from llkern.data.images import load_digits

    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits(seed=0)
    epochs, batch_size = 8, 64
    total_steps = epochs * math.ceil(len(y_train) / batch_size)
    accuracy = {}
    started = time.perf_counter()
    for name, num_modules in (("local", 4), ("end_to_end", 1)):
        torch.manual_seed(0)
        blocks = digits_resnet(4)
        if num_modules == 1:  # the same network and head as one module: plain backpropagation
            blocks = [nn.Sequential(*blocks)]
        net = llkern.LocalNet(blocks, num_classes=10, example_input=x_train[:2])
        trainer = LocalTrainer(
            net, optimizer=lambda p: torch.optim.Adam(p, lr=2e-3), scheduler_interval="step", seed=0,
            scheduler=lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 2e-3, total_steps=total_steps))
        trainer.fit((x_train, y_train), epochs=epochs, batch_size=batch_size, progress=False)
        accuracy[name] = trainer.evaluate(x_test, y_test)["accuracy"]
    print(f"digits accuracy: {accuracy}, {time.perf_counter() - started:.1f} s")
    assert accuracy["end_to_end"] > 0.95
    assert accuracy["local"] >= accuracy["end_to_end"] - 0.02


def test_a_loss_with_parameters_shared_by_modules_is_refused():
    # one Reconstruction (with its decoders) given for every module: module 1's decoder gradient would
    # arrive after module 0's optimizer had stepped and cleared it, and never be applied
    x = torch.randn(4, 1, 8, 8)
    shared = llkern.Composite([(llkern.Reconstruction(llkern.reconstruction_decoders(x.shape[1:])), 1.0),
                               (llkern.CrossEntropy(), 1.0)])
    net = llkern.LocalNet(digits_resnet(2, width=8), num_classes=10, losses=shared, example_input=x[:2])
    with pytest.raises(ValueError, match="belongs to modules 0 and 1"):
        llkern.LocalTrainer(net)


def test_bad_arguments_are_named_before_any_work():
    # (each once failed late: fit(epochs=-1) returned [], epochs=2.5 trained 3, evaluate(batch_size=0) failed in
    # range(), LocalNet(num_classes=2.5) inside a tensor constructor, local_step on a 0-d tensor with IndexError)
    blocks = [nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Sequential(nn.Linear(8, 8), nn.ReLU())]
    net = llkern.LocalNet(blocks, num_classes=3, example_input=torch.randn(2, 4))
    trainer = llkern.LocalTrainer(net)
    data = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    for epochs in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match="epochs"):
            trainer.fit(data, epochs=epochs, progress=False)
    assert trainer.history == [] and trainer.epoch == 0
    with pytest.raises(ValueError, match="batch_size"):
        trainer.evaluate(*data, batch_size=0)
    with pytest.raises(ValueError, match="num_classes"):
        llkern.LocalNet([nn.Sequential(nn.Linear(4, 8), nn.ReLU())], num_classes=2.5)
    with pytest.raises(ValueError, match="x with a batch dimension"):
        net.local_step(torch.tensor(1.0), torch.tensor(1))
    with pytest.raises(TypeError, match="target to be a Tensor"):
        net.local_step(torch.randn(2, 4), [0, 1])
    # evaluate: x and y of different lengths once gave a plausible wrong loss and accuracy
    x, y = data
    with pytest.raises(ValueError, match="same length, got 6 and 4"):
        trainer.evaluate(x, y[:4])
    with pytest.raises(ValueError, match="exit to be a module index or 'all'"):
        trainer.evaluate(x, y, exit="last")
    with pytest.raises(ValueError, match="iterable of \\(x, y\\) batches"):
        trainer.evaluate(x)
    # ReduceLROnPlateau needs a metric: refused when built, not after an epoch's work
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        llkern.LocalTrainer(net, scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o))


def test_fit_makes_the_folders_of_its_outputs_and_advances_a_samplers_epoch(tmp_path):
    x, y = data(32)
    epochs_seen = []

    class Sampler(torch.utils.data.Sampler):  # as DistributedSampler: its order depends on set_epoch
        def __init__(self):
            self.epoch = 0

        def set_epoch(self, epoch):
            epochs_seen.append(epoch)
            self.epoch = epoch

        def __iter__(self):
            return iter(torch.randperm(32, generator=torch.Generator().manual_seed(self.epoch)).tolist())

        def __len__(self):
            return 32

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, sampler=Sampler())
    trainer = LocalTrainer(small_net(), optimizer=sgd())
    trainer.fit(loader, 3, progress=False, checkpoint=tmp_path / "a" / "b" / "c.pt", log=tmp_path / "d" / "log.json")
    assert epochs_seen == [0, 1, 2]
    assert (tmp_path / "a" / "b" / "c.pt").is_file() and (tmp_path / "d" / "log.json").is_file()


def test_resume_continues_the_augmentation_generator(tmp_path):
    # RandomCropFlip with its own generator (as llkern train uses): its state travels with the checkpoint,
    # so the resumed run crops and flips as the uninterrupted one.
    from llkern.data import RandomCropFlip

    x, y = data(32)

    def make():
        return (LocalTrainer(small_net(), optimizer=sgd(0.1, 0.9), seed=3),
                RandomCropFlip(padding=2, generator=torch.Generator().manual_seed(9)))

    full, augment = make()
    full.fit((x, y), 3, batch_size=16, progress=False, transform=augment)
    first, augment = make()
    first.fit((x, y), 1, batch_size=16, progress=False, transform=augment, checkpoint=tmp_path / "c.pt")
    resumed, augment = make()
    resumed.load(tmp_path / "c.pt")
    resumed.fit((x, y), 3, batch_size=16, progress=False, transform=augment)
    for p, q in zip(resumed.net.state_dict().values(), full.net.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_fit_transforms_training_batches_only_and_writes_every_sink(tmp_path):
    torch.manual_seed(0)
    x, y = data()
    seen = []

    def transform(xb):
        seen.append(xb.shape[0])
        return xb.flip(-1)

    rows_seen = []
    trainer = LocalTrainer(small_net(), optimizer=sgd())
    log = tmp_path / "log.csv"
    trainer.fit((x, y), 2, batch_size=16, eval_data=(x, y), progress=False, transform=transform,
                log=[rows_seen.append, log])
    assert seen == [16, 16, 16] * 2  # every training batch, never the evaluation's
    assert [r["epoch"] for r in rows_seen] == [1, 2] and log.read_text().count("\n") == 3
    with pytest.raises(ValueError, match="log: expected a log path ending in"):
        LocalTrainer(small_net(), optimizer=sgd()).fit((x, y), 1, progress=False, log=[tmp_path / "log.txt"])
    with pytest.raises(TypeError, match="transform"):
        LocalTrainer(small_net(), optimizer=sgd()).fit((x, y), 1, progress=False, transform="flip")


def test_metadata_travels_with_the_checkpoint(tmp_path):
    x, y = data()
    trainer = LocalTrainer(small_net(), optimizer=sgd())
    trainer.metadata["options"] = {"k": 3, "model": "small"}
    trainer.fit((x, y), 1, progress=False, checkpoint=tmp_path / "c.pt")
    again = LocalTrainer(small_net(), optimizer=sgd()).load(tmp_path / "c.pt")
    assert again.metadata == {"options": {"k": 3, "model": "small"}} and again.epoch == 1
