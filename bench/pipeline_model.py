"""A model of the decoupled pipeline on larger machines, from quantities measured here.

    OMP_NUM_THREADS=1 python bench/pipeline_model.py [--depth 110] [-k 16] [--batch-size 128]
        [--device-speedup 1] [--microbatches-per-stage 4]

Measured on this machine (one thread, the model's own layers):

* T_k: module k's local step (forward, head, local loss, backward, optimizer step excluded) on one batch;
* E_k: the same layers' forward + backward in end-to-end training (no head; gradient from above);
* the bytes each boundary carries, and the saved-for-backward bytes of each module and stage.

Then, for S = 2, 4, 8, 16 stages on two kinds of link (NVLink 450 GB/s, 200 Gb/s = 25 GB/s, each with
a per-message latency), the time per batch of

* local training on one device: Σ T_k;
* the decoupled pipeline: max over stages of max(T_s, c_s) (compute and messages overlap: sends are
  asynchronous and receives posted ahead), c_s = message bytes / bandwidth + latency, forward only;
* end-to-end 1F1B (or GPipe: the same bubble) with m = micro-batches-per-stage × S micro-batches:
  (m + S − 1) · max_s(E_s / m + 2 · c_s / m-sized messages), activations forward and gradients back.
  It assumes the stage times scale linearly with the micro-batch (optimistic for 1F1B on small
  micro-batches).

Printed beside them: the goals (decoupled ≥ 0.8·S × one device, ≥ 1.25 × 1F1B) and the activation
stash of stage 0 (decoupled: its largest module's saved bytes plus ``depth`` boundaries in flight; 1F1B:
min(S, m) micro-batches of the whole stage's saved activations).

``--device-speedup F`` divides every measured time by F to model a device F times faster than one
core of this CPU (communication then weighs more); the default 1 uses the times as measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline_common as pc
from common import append_result, machine

import llkern
from llkern.local.memory import MemoryMeter
from llkern.local.pipeline import Placement, module_costs

LINKS = {"NVLink 450 GB/s": (450e9, 2e-6), "200 Gb/s (25 GB/s)": (25e9, 5e-6)}


def end_to_end_costs(net: llkern.LocalNet, head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     repeats: int) -> tuple[list[float], list[int]]:
    """Per module: forward + backward seconds of its blocks as end-to-end training runs them (input
    gradient included, the classifier on the last), and the bytes they save for backward."""
    times, saved = [], []
    h = x
    for k, block in enumerate(net.blocks):
        inp = h.detach().requires_grad_(k > 0)
        runs = []
        for r in range(repeats + 1):
            block.zero_grad(set_to_none=True)
            started = time.perf_counter()
            with MemoryMeter() as meter:
                out = block(inp)
                top = torch.nn.functional.cross_entropy(head(out), y) if k == net.num_modules - 1 else out
            grad = None if top.dim() == 0 else torch.randn_like(top)
            top.backward(grad)
            if r:
                runs.append(time.perf_counter() - started)
        times.append(sorted(runs)[len(runs) // 2])
        saved.append(meter.peak_saved_bytes)
        h = out.detach()
    net.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    return times, saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=110)
    parser.add_argument("-k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--split", default="time", help="what llkern.split balances between the K modules")
    parser.add_argument("--device-speedup", type=float, default=1.0)
    parser.add_argument("--microbatches-per-stage", type=int, default=4)
    parser.add_argument("--pipeline-depth", type=int, default=2)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = pc.local_net(args.depth, args.k, by=args.split)
        _, head = pc.resnet_units(args.depth)
    x, y = pc.batches(1, args.batch_size)[0]
    B = args.batch_size
    local = [t / args.device_speedup for t in module_costs(net, x, y, repeats=args.repeats)]
    local_saved = [row.peak_saved_bytes for row in net.memory_profile(x, y)]
    net.zero_grad(set_to_none=True)
    e2e, e2e_saved = end_to_end_costs(net, head, x, y, args.repeats)
    e2e = [t / args.device_speedup for t in e2e]
    with torch.no_grad():
        h, boundary_bytes = x, []
        for block in net.blocks:
            h = block(h)
            boundary_bytes.append(h.numel() * h.element_size())
    label_bytes = y.numel() * y.element_size()
    one_device = sum(local)
    print(f"ResNet-{args.depth}, K={args.k} (split by {args.split}), batch {B}, times ÷ {args.device_speedup:g} "
          f"({machine()['device']}, 1 thread): local step {1e3 * one_device:.1f} ms on one device, "
          f"end-to-end step {1e3 * sum(e2e):.1f} ms")
    rows = []
    header = (f"{'S':>3} {'link':<20} {'decoupled ms':>12} {'× 1 device':>10} {'goal 0.8·S':>10} "
              f"{'1F1B ms':>8} {'bubble':>7} {'decoupled ÷ 1F1B':>16} {'goal':>5}  "
              f"{'stash st.0 local':>16} {'stash st.0 1F1B':>15}")
    print(header)
    for S in (2, 4, 8, 16):
        if S > args.k:
            continue
        placement = Placement.balanced(args.k, S, costs=local)
        e2e_placement = Placement.balanced(args.k, S, costs=e2e)
        m = args.microbatches_per_stage * S
        for link, (bandwidth, latency) in LINKS.items():
            def message(stage: range, micro: int = 1, bandwidth: float = bandwidth, latency: float = latency) -> float:
                return (boundary_bytes[stage.stop - 1] + label_bytes) / micro / bandwidth + latency

            decoupled = max(max(sum(local[k] for k in st), message(st) if st.stop < args.k else 0.0)
                            for st in placement.stages)
            per_micro = max(sum(e2e[k] for k in st) / m + (2 * message(st, m) if st.stop < args.k else 0.0)
                            for st in e2e_placement.stages)
            one_f = (m + S - 1) * per_micro
            first = placement.stages[0]
            stash_local = max(local_saved[k] for k in first) + args.pipeline_depth * boundary_bytes[first.stop - 1]
            stash_1f1b = min(S, m) * sum(e2e_saved[k] for k in e2e_placement.stages[0]) / m
            row = {"S": S, "link": link, "decoupled_ms": 1e3 * decoupled, "speedup": one_device / decoupled,
                   "one_f_one_b_ms": 1e3 * one_f, "bubble": (S - 1) / (m + S - 1), "vs_1f1b": one_f / decoupled,
                   "stash_local_mib": stash_local / 2**20, "stash_1f1b_mib": stash_1f1b / 2**20, "m": m}
            rows.append(row)
            print(f"{S:>3} {link:<20} {row['decoupled_ms']:12.1f} {row['speedup']:10.2f} {0.8 * S:10.1f} "
                  f"{row['one_f_one_b_ms']:8.1f} {row['bubble']:7.2f} {row['vs_1f1b']:16.2f} {1.25:5.2f}  "
                  f"{row['stash_local_mib']:13.1f} MiB {row['stash_1f1b_mib']:12.1f} MiB")
    print(f"1F1B: m = {args.microbatches_per_stage}·S micro-batches; messages: boundary + labels per micro-batch "
          "(1F1B: activation forward and gradient back)")
    for row in rows:
        append_result({"bench": "pipeline_model", "depth": args.depth, "k": args.k, "batch": B,
                       "device_speedup": args.device_speedup, **row})
    if args.json:
        Path(args.json).write_text(json.dumps({"local_ms": [1e3 * t for t in local], "e2e_ms": [1e3 * t for t in e2e],
                                               "boundary_bytes": boundary_bytes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
