"""ContSup on digits, K = 4: each context mode against plain local training and end to end.

Same model (llkern.models.digits_resnet(4, width=32)), data, epochs, optimizer (Adam, one-cycle,
the demo's recipe) and initial weights for every run; cross-entropy local losses. Prints a
markdown table: test accuracy, median step time, and the context encoders' parameters and FLOPs
(per sample, convolutions). The fused add runs as plain PyTorch here (``--impl reference``, the
default on a CPU: Triton's interpreter is for tests); on a GPU use ``--impl kernel``.

    python bench/contsup_digits.py [--epochs 20] [--impl reference|kernel]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import llkern
from llkern.cli.demo import _train
from llkern.data.images import load_digits
from llkern.models import digits_resnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impl", default="reference", choices=("auto", "kernel", "reference"))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = load_digits(seed=args.seed)
    blocks = digits_resnet(4, width=args.width)
    rows = []
    for mode in (None, "E", "R", "RE"):
        torch.manual_seed(args.seed)
        net = llkern.LocalNet(copy.deepcopy(blocks), num_classes=10, example_input=data[0][:2], context=mode,
                              context_impl=args.impl)
        name = "local K=4" if mode is None else f"ContSup {mode}"
        result = _train(name, net, lambda x, y, net=net: net.local_step(x, y).losses[-1], data, args)
        cost = net.context.cost() if net.context is not None else None
        rows.append((name, result, cost))
    torch.manual_seed(args.seed)
    reference = llkern.LocalNet(copy.deepcopy(blocks), num_classes=10, example_input=data[0][:2])
    end_to_end = nn.Sequential(*copy.deepcopy(blocks), copy.deepcopy(reference.heads[-1]))

    def e2e_step(x, y):
        loss = F.cross_entropy(end_to_end(x), y)
        loss.backward()
        return loss.item()

    rows.append(("end to end", _train("end to end", end_to_end, e2e_step, data, args), None))

    network = sum(p.numel() for b in blocks for p in b.parameters()) + sum(
        p.numel() for p in reference.heads[-1].parameters())
    print(f"\ndigits, K = 4, width {args.width}, {args.epochs} epochs, seed {args.seed}; network {network} parameters")
    print("| training | test accuracy | step ms | encoder parameters | encoder MFLOPs / sample |")
    print("|---|---|---|---|---|")
    for name, result, cost in rows:
        params = f"{cost.total_parameters}" if cost else "—"
        flops = f"{cost.total_flops / 1e6:.2f}" if cost else "—"
        print(f"| {name} | {100 * result.test_accuracy:.2f} % | {result.step_ms:.1f} | {params} | {flops} |")


if __name__ == "__main__":
    main()
