"""Activation-memory options on digits, K = 4: saved bytes, step time and accuracy of each option.

For ``llkern.models.digits_resnet(4, width=W)`` trained locally with ``llkern.LocalNet`` (linear heads,
cross-entropy), and each option of ``llkern.nn.activation_memory`` (none, 1-bit ReLU masks, BN+ReLU
recomputation, both, bfloat16 saved tensors, recomputation with bfloat16 saved tensors, recomputed segments
inside each module, and segments with BN+ReLU recomputation and bfloat16 saved tensors):

- peak saved bytes of one local step at batch ``--batch-size`` (``MemoryMeter`` around
  ``LocalNet.local_step``: distinct storages saved for backward; on CUDA also the allocator's peak),
- the median step time over ``--steps`` steps at that batch (after two warm-up steps),
- test accuracy after a short training run (``--epochs`` epochs, batch ``--train-batch-size``, Adam with a
  one-cycle schedule peaking at ``--lr``, the demo's recipe), from the same initial weights and data order.

Prints a markdown table.

    python bench/activation_memory.py [--epochs 3] [--width 32] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from common import pytorch_activation_ops

import llkern
from llkern.data.images import load_digits
from llkern.local.memory import MemoryMeter
from llkern.models import digits_resnet
from llkern.nn.activation_memory import convert, saved_tensors_in

# name, convert() options, dtype of saved tensors (None: unchanged), recomputed segments per module (1: none)
OPTIONS: list[tuple[str, dict[str, bool], torch.dtype | None, int]] = [
    ("none", {}, None, 1),
    ("1-bit ReLU masks", {"relu_masks": True}, None, 1),
    ("BN+ReLU recompute", {"bn_relu_recompute": True}, None, 1),
    ("masks + recompute", {"relu_masks": True, "bn_relu_recompute": True}, None, 1),
    ("bf16 saved tensors", {}, torch.bfloat16, 1),
    ("recompute + bf16 saved", {"bn_relu_recompute": True}, torch.bfloat16, 1),
    ("recomputed segments (2 per module)", {}, None, 2),
    ("segments + BN+ReLU recompute + bf16", {"bn_relu_recompute": True}, torch.bfloat16, 2),
]
# The exact options again on PyTorch ops instead of the compiled ones (--pytorch-ops): before and after.
PYTORCH_OPS_OPTIONS = [(f"{name}, PyTorch ops", options, dtype, segments)
                       for name, options, dtype, segments in OPTIONS[1:4]]


def _stepper(net: llkern.LocalNet, dtype: torch.dtype | None,
             pytorch_ops: bool) -> Callable[[torch.Tensor, torch.Tensor], float]:
    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with pytorch_activation_ops(pytorch_ops):
            if dtype is None:
                return net.local_step(x, y).losses[-1]
            with saved_tensors_in(dtype):
                return net.local_step(x, y).losses[-1]

    return step


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "CPU"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _accuracy(net: llkern.LocalNet, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x[i:i + 512]).argmax(1) == y[i:i + 512]).sum()) for i in range(0, len(y), 512))
    net.train()
    return correct / len(y)


class Run:
    """One option: its LocalNet (from the shared initial weights), its step, and what was measured."""

    def __init__(self, name: str, options: dict[str, bool], dtype: torch.dtype | None, segments: int,
                 blocks: list[torch.nn.Module], example: torch.Tensor, seed: int, device: torch.device) -> None:
        torch.manual_seed(seed)
        self.name = name
        modules = [convert(copy.deepcopy(b), **options) for b in blocks]
        if segments > 1:
            modules = llkern.recompute_modules(modules, segments, example_input=example)
        self.net = llkern.LocalNet(modules, num_classes=10, example_input=example).to(device)
        self.step = _stepper(self.net, dtype, name.endswith("PyTorch ops"))
        self.initial = copy.deepcopy(self.net.state_dict())
        self.times: list[float] = []
        self.saved = 0
        self.cuda: int | None = None
        self.accuracy = 0.0


def measure_memory(run: Run, xb: torch.Tensor, yb: torch.Tensor, device: torch.device) -> None:
    for _ in range(2):  # warm-up (lazy heads, allocator, one-time kernels)
        run.step(xb, yb)
    run.net.zero_grad(set_to_none=True)
    with MemoryMeter(exclude=run.net.parameters(), device=device if device.type == "cuda" else None) as meter:
        run.step(xb, yb)
    run.net.zero_grad(set_to_none=True)
    run.saved, run.cuda = meter.peak_saved_bytes, meter.cuda_peak_bytes


def time_step(run: Run, xb: torch.Tensor, yb: torch.Tensor, device: torch.device) -> None:
    _sync(device)
    start = time.perf_counter()
    run.step(xb, yb)
    _sync(device)
    run.times.append(time.perf_counter() - start)
    run.net.zero_grad(set_to_none=True)


def train_and_test(run: Run, data: tuple[torch.Tensor, ...], args: argparse.Namespace, device: torch.device) -> None:
    x_train, y_train, x_test, y_test = data
    net = run.net
    net.load_state_dict(run.initial)  # the measurement steps moved the BN statistics
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(y_train) // args.train_batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(args.seed)
    net.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(0, len(y_train), args.train_batch_size):
            idx = order[i:i + args.train_batch_size]
            optimizer.zero_grad(set_to_none=True)
            run.step(x_train[idx].to(device), y_train[idx].to(device))
            optimizer.step()
            schedule.step()
    run.accuracy = _accuracy(net, x_test.to(device), y_test.to(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256, help="batch of the memory and time measurements")
    parser.add_argument("--steps", type=int, default=7, help="timed steps (median)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pytorch-ops", action="store_true",
                        help="also run the exact options on PyTorch ops instead of llkern's compiled "
                             "relu_with_mask / batch_norm_relu (before and after, side by side)")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    data = load_digits(seed=args.seed)
    blocks = digits_resnet(4, width=args.width)
    runs = [Run(name, options, dtype, segments, blocks, data[0][:2], args.seed, device)
            for name, options, dtype, segments in OPTIONS + (PYTORCH_OPS_OPTIONS if args.pytorch_ops else [])]

    x_train, y_train = data[0], data[1]
    xb, yb = x_train[: args.batch_size], y_train[: args.batch_size]
    if len(yb) < args.batch_size:  # digits has 1437 training images: repeat them to fill a larger batch
        reps = -(-args.batch_size // len(yb))
        xb, yb = xb.repeat(reps, 1, 1, 1)[: args.batch_size], yb.repeat(reps)[: args.batch_size]
    # Own storage for the batch (as a data loader gives): the meter counts whole storages, and a slice of
    # the training set would count all of it.
    xb, yb = xb.to(device).clone(), yb.to(device).clone()
    for run in runs:
        measure_memory(run, xb, yb, device)
    # Round robin, so that a change in the machine's load (it is shared) hits every option alike.
    for _ in range(args.steps):
        for run in runs:
            time_step(run, xb, yb, device)
    for run in runs:
        train_and_test(run, data, args, device)
        print(f"  {run.name}: {run.saved / 2**20:.2f} MiB, {1e3 * statistics.median(run.times):.1f} ms, "
              f"{100 * run.accuracy:.2f} %", flush=True)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(f"\ndigits_resnet(4, width={args.width}), LocalNet K=4, linear heads, fp32 parameters; {machine}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; memory and time at batch "
          f"{args.batch_size} (median of {args.steps} steps); accuracy after {args.epochs} epochs at batch "
          f"{args.train_batch_size}, Adam one-cycle {args.lr}, seed {args.seed}\n")
    base = runs[0]
    cuda = device.type == "cuda"
    header = "| option | peak saved MiB | vs none |" + (" CUDA peak MiB |" if cuda else "")
    print(header + " step ms (min–max) | vs none | test accuracy |")
    print("|---" * (header.count("|") + 2) + "|")
    base_ms = statistics.median(base.times)
    for run in runs:
        ms = statistics.median(run.times)
        cells = [run.name, f"{run.saved / 2**20:.2f}", f"{run.saved / base.saved:.2f}×"]
        if cuda:
            cells.append(f"{run.cuda / 2**20:.1f}")
        cells += [f"{1e3 * ms:.1f} ({1e3 * min(run.times):.0f}–{1e3 * max(run.times):.0f})", f"{ms / base_ms:.2f}×",
                  f"{100 * run.accuracy:.2f} %"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
