"""Decoupled pipeline on this machine's CPU: images per second, side by side in one run.

    OMP_NUM_THREADS=1 python bench/pipeline_throughput.py [--depth 32] [-k 4] [--batch-size 64] [--steps 8]

Rows (same model, same batches, same initialisation):

* local training in one process with 1 thread, and with 2 threads (LocalTrainer);
* the decoupled pipeline: 2 stages × 1 thread, two gloo processes (PipelineTrainer), modules placed by
  measured time (plan_stages); its parameters are compared bitwise with the 1-thread run's;
* end-to-end backprop of the same ResNet (with its classifier) in one process, 1 and 2 threads;
* torch.distributed.pipelining's 1F1B schedule of that end-to-end model on the same 2-process layout
  (cut at the pipeline's stage boundary, ``--microbatches`` micro-batches per batch).

Each row: warm-up steps, then the timed steps; images/s over the timed steps (for the processes, the
wall time between two barriers). Appends a row per configuration to bench/results/results.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_common as pc
from common import append_result, machine

import llkern


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def run_local(args, threads: int) -> tuple[float, dict]:
    torch.set_num_threads(threads)
    net = pc.local_net(args.depth, args.k)
    trainer = llkern.LocalTrainer(net, optimizer=sgd, measure_memory=False, seed=0)
    data = pc.batches(args.warmup + args.steps, args.batch_size)
    trainer.fit(data[:args.warmup], 1, progress=False)
    started = time.perf_counter()
    trainer.fit(data[args.warmup:], 2, progress=False)
    return time.perf_counter() - started, net.state_dict()


def _pipeline_worker(rank, world, args, placement):
    import torch.distributed as dist

    net = pc.local_net(args.depth, args.k)
    trainer = llkern.PipelineTrainer(net, placement, optimizer=sgd, measure_memory=False, seed=0,
                                     depth=args.pipeline_depth)
    data = pc.batches(args.warmup + args.steps, args.batch_size)
    trainer.fit(data[:args.warmup], 1, progress=False)
    dist.barrier()
    started = time.perf_counter()
    trainer.fit(data[args.warmup:], 2, progress=False)
    dist.barrier()
    seconds = time.perf_counter() - started
    return seconds, {k: v for k, v in net.state_dict().items() if k in trainer._stage_parameters()}


def run_e2e(args, threads: int) -> float:
    torch.set_num_threads(threads)
    units, head = pc.resnet_units(args.depth)
    model = torch.nn.Sequential(*units, head)
    optimizer = sgd(model.parameters())
    data = pc.batches(args.warmup + args.steps, args.batch_size)
    started = 0.0
    for i, (x, y) in enumerate(data):
        if i == args.warmup:
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - started


def _one_f_one_b_worker(rank, world, args, cut):
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    units, head = pc.resnet_units(args.depth)
    parts = [torch.nn.Sequential(*units[:cut]), torch.nn.Sequential(*units[cut:], head)]
    module = parts[rank]
    micro = args.batch_size // args.microbatches
    example = torch.randn(micro, 3, 32, 32)
    if rank == 1:
        with torch.no_grad():
            example = parts[0](example)
    stage = PipelineStage(module, rank, world, torch.device("cpu"), input_args=(example,))
    schedule = Schedule1F1B(stage, args.microbatches, loss_fn=torch.nn.functional.cross_entropy)
    optimizer = sgd(module.parameters())
    data = pc.batches(args.warmup + args.steps, args.batch_size)
    started = 0.0
    for i, (x, y) in enumerate(data):
        if i == args.warmup:
            dist.barrier()
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y)
        optimizer.step()
    dist.barrier()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=32, help="CIFAR ResNet depth")
    parser.add_argument("-k", type=int, default=4, help="local modules")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4, help="1F1B micro-batches per batch")
    parser.add_argument("--pipeline-depth", type=int, default=2, help="PipelineTrainer(depth=)")
    args = parser.parse_args()
    images = args.steps * args.batch_size

    # placement by measured time, on one thread (as each stage runs)
    torch.set_num_threads(1)
    probe = pc.local_net(args.depth, args.k)
    x, y = pc.batches(1, args.batch_size, seed=1)[0]
    costs = llkern.local.pipeline.module_costs(probe, x, y, repeats=2)
    placement = llkern.Placement.balanced(args.k, 2, costs=costs)
    cut_module = placement.stages[1].start
    cut_units = sum(len(list(probe.blocks[k].children())) for k in range(cut_module))
    print(f"ResNet-{args.depth}, K={args.k}, batch {args.batch_size}, {args.steps} timed steps; module times "
          f"{', '.join(f'{1e3 * c:.0f}' for c in costs)} ms; {placement} (1F1B cut after unit {cut_units - 1})",
          flush=True)

    rows = []
    seconds, local_state = run_local(args, 1)
    rows.append(("local, 1 process × 1 thread", seconds, ""))
    seconds, _ = run_local(args, 2)
    rows.append(("local, 1 process × 2 threads", seconds, ""))
    results = pc.launch(_pipeline_worker, 2, args, placement, threads=1)
    equal = all(torch.equal(v, local_state[k]) for _, state in results for k, v in state.items())
    covered = set().union(*(state.keys() for _, state in results)) >= {k for k, v in local_state.items()
                                                                         if v.is_floating_point()}
    rows.append(("pipeline, 2 stages × 1 thread (gloo)", max(s for s, _ in results),
                 f"parameters bitwise equal to the 1-thread local run: {equal and covered}"))
    rows.append(("end-to-end, 1 process × 1 thread", run_e2e(args, 1), ""))
    rows.append(("end-to-end, 1 process × 2 threads", run_e2e(args, 2), ""))
    try:
        one_f = pc.launch(_one_f_one_b_worker, 2, args, cut_units, threads=1)
        rows.append((f"end-to-end 1F1B (torch.distributed.pipelining), 2 stages × 1 thread, "
                     f"{args.microbatches} micro-batches", max(one_f), ""))
    except Exception as error:  # report, do not hide, a peer that cannot run here
        print(f"1F1B: could not run ({type(error).__name__}: {error})")

    base = images / rows[0][1]
    print(f"\n{'configuration':<72} {'images/s':>9} {'× local 1t':>10}")
    for name, seconds, note in rows:
        rate = images / seconds
        print(f"{name:<72} {rate:9.1f} {rate / base:10.2f}  {note}")
        append_result({"bench": "pipeline_throughput", "config": name, "images_per_s": rate,
                       "seconds": seconds, "depth": args.depth, "k": args.k, "batch": args.batch_size,
                       "steps": args.steps, "placement": str(placement), "note": note})
    print(machine())


if __name__ == "__main__":
    main()
