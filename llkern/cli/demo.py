"""The main job: local training (K modules + TRGL's transport penalty) against end-to-end
backpropagation on scikit-learn's digits, same model, epochs and optimizer.

Run with ``llkern demo`` (or ``make demo``); ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from llkern.cli.options import (
    HelpFormatter,
    int_between,
    make_parents,
    output_path,
    plain_text,
    positive_float,
    positive_int,
)
from llkern.data.images import load_digits
from llkern.local.memory import MemoryMeter
from llkern.local.net import LocalNet
from llkern.models import digits_resnet
from llkern.nn.losses import TransportRegularized


@dataclass
class RunResult:
    name: str
    test_accuracy: float
    step_ms: float
    peak_saved_bytes: int
    accuracy_per_epoch: list[float]


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()
def _accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def _train(name: str, model: nn.Module, step: Callable[[torch.Tensor, torch.Tensor], float],
           data, args) -> RunResult:
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(y_train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(args.seed)
    times, history = [], []
    bar = tqdm(range(args.epochs), desc=f"{name:>12}", unit="epoch", leave=True)
    for _ in bar:
        model.train()
        for idx in _batches(len(y_train), args.batch_size, generator):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = step(x_train[idx], y_train[idx])
            optimizer.step()
            times.append(time.perf_counter() - start)
            schedule.step()
        model.eval()
        history.append(_accuracy(model, x_test, y_test))
        bar.set_postfix(loss=f"{loss:.3f}", test_acc=f"{history[-1]:.4f}")
    model.eval()
    accuracy = _accuracy(model, x_test, y_test)
    # Peak saved-activation memory of one training step at the training batch size.
    model.train()
    params = list(model.parameters())
    with MemoryMeter(exclude=params) as meter:
        step(x_train[: args.batch_size], y_train[: args.batch_size])
    optimizer.zero_grad(set_to_none=True)
    return RunResult(name, accuracy, 1e3 * statistics.median(times), meter.peak_saved_bytes, history)


def run(args: argparse.Namespace) -> list[RunResult]:
    torch.manual_seed(args.seed)
    data = load_digits(seed=args.seed)
    blocks = digits_resnet(args.modules)
    local = LocalNet(copy.deepcopy(blocks), num_classes=10, example_input=data[0][:2],
                     losses=TransportRegularized(tau=args.tau, tau_schedule=args.tau_schedule))
    # End to end: the same modules chained, ending in the same (last) head, from the same initial weights.
    end_to_end = nn.Sequential(*copy.deepcopy(blocks), copy.deepcopy(local.heads[-1]))

    def local_step(x, y):
        return local.local_step(x, y).losses[-1]

    def e2e_step(x, y):
        loss = F.cross_entropy(end_to_end(x), y)
        loss.backward()
        return loss.item()

    return [
        _train(f"local K={args.modules}", local, local_step, data, args),
        _train("end to end", end_to_end, e2e_step, data, args),
    ]


def format_table(results: list[RunResult]) -> str:
    lines = [f"{'training':<14} {'test acc':>9} {'step (ms)':>10} {'peak saved activations':>24}",
             "-" * 60]
    for r in results:
        lines.append(f"{r.name:<14} {100 * r.test_accuracy:>8.2f}% {r.step_ms:>10.2f} "
                     f"{r.peak_saved_bytes / 2**20:>20.2f} MiB")
    base = results[-1].peak_saved_bytes
    lines.append(f"local peak activation memory = {100 * results[0].peak_saved_bytes / base:.1f}% of end to end")
    return "\n".join(lines)


def plot(results: list[RunResult], path: str) -> bool:
    """Test accuracy per epoch and peak saved activations, side by side; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (curves, memory) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    for r in results:
        curves.plot(range(1, len(r.accuracy_per_epoch) + 1), [100 * a for a in r.accuracy_per_epoch],
                    marker="o", markersize=3, label=f"{r.name} ({100 * r.test_accuracy:.2f}%)")
    curves.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(50, 100), title="digits, test accuracy")
    curves.grid(alpha=0.3)
    curves.legend(loc="lower right")
    names = [r.name for r in results]
    memory.bar(names, [r.peak_saved_bytes / 2**20 for r in results], color=["tab:blue", "tab:orange"])
    memory.set(ylabel="MiB", title="peak saved activations")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(__doc__),
                                     formatter_class=HelpFormatter)
    parser.add_argument("--modules", type=int_between(1, 8), default=4, help="number of local modules K (1..8)")
    parser.add_argument("--epochs", type=positive_int, default=20, help="training epochs of each run")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="samples per step")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (Adam, one-cycle)")
    parser.add_argument("--tau", type=positive_float, default=1.0, help="transport-penalty tau")
    parser.add_argument("--tau-schedule", choices=("constant", "varying"), default="constant",
                        help="tau the same for every module, or varying with depth")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and shuffling")
    parser.add_argument("--plot", default="demo.png", help="where to save the plot ('' for none; needs matplotlib)")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.plot:
        output_path("--plot", args.plot)  # before the training, not after it
    results = run(args)
    print(format_table(results))
    if args.plot:
        saved = plot(results, make_parents(args.plot))
        print(f"plot saved to {args.plot}" if saved else "matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
