"""MODA on digits (or CIFAR-10 from local files): train plainly and with MODA's losses, extract modules.

    llkern moda [--data digits|cifar10] [--model cnn|resnet] [--data-root DIR] [--epochs E]
                   [--out report.md]

1. Train the same network from the same initial weights twice: cross-entropy only ("plain"), and
   cross-entropy + MODA's affinity, dispersion and compactness terms (1.0/1.0/0.3) on every ReLU output.
2. On the MODA-trained model, compute per-class unit masks on the training set (τ = ``--tau``) and
   extract, without fine-tuning, the module of every single class and of a few pairs (``--pairs``).
3. Report each module's weights (fraction of the full model) and its accuracy on the test samples of
   its classes next to the full model's on the same samples, the composed accuracy of all the
   single-class modules, the overlap between modules, and MODA's published VGG16/CIFAR-10 figures.

``--model cnn`` (default): on digits :func:`llkern.models.moda_cnn.digits_cnn` (four conv layers), on
CIFAR-10 :func:`llkern.models.vgg16` (``--width`` scales it). ``--model resnet``:
:func:`llkern.models.moda_cnn.digits_resnet_moda` (a stem and three residual blocks; on CIFAR-10 with three
input channels). CIFAR-10 is read by :func:`llkern.data.images.load_cifar10`.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from llkern.cli.options import (
    HelpFormatter,
    UsageError,
    check_device,
    fraction,
    make_parents,
    output_path,
    plain_text,
    positive_float,
    positive_float_at_most,
    positive_int,
)
from llkern.data.images import load_cifar10, load_digits
from llkern.moda import MODALoss, MODAReport, class_masks, count_weights, extract, modularity_report
from llkern.models import vgg16
from llkern.models.moda_cnn import digits_cnn, digits_resnet_moda

__all__ = ["PUBLISHED", "DemoResult", "main", "run"]

# MODA's figures for VGG16 on CIFAR-10 (Ngo et al., arXiv 2411.01074), as quoted in issue 7.
PUBLISHED = {"model": "VGG16 / CIFAR-10", "weights_fraction": 0.027, "overlap": 0.014,
             "accuracy_moda": 0.9186, "accuracy_reference": 0.9262}
DEFAULT_PAIRS = ((3, 8), (4, 9), (1, 7), (5, 6), (0, 2))


@dataclass
class DemoResult:
    """What :func:`run` measured."""

    data: str
    model: str
    epochs: int
    accuracy_plain: float
    accuracy_moda: float
    report: MODAReport
    plain_single_fraction: float  # mean size of the single-class modules extracted from the plain model
    seconds: float

    @property
    def full_within_1_point(self) -> bool:
        return self.accuracy_moda >= self.accuracy_plain - 0.01

    def module_bars(self) -> list[tuple[tuple[int, ...], bool]]:
        """Per module: within 2 points of the full model on its samples (both measures) at ≤ 30% weights."""
        return [(r.classes, r.fraction <= 0.30 and r.module_restricted >= r.full_restricted - 0.02
                 and r.module_all >= r.full_all - 0.02) for r in self.report.rows]

    @property
    def meets_bars(self) -> bool:
        return self.full_within_1_point and all(ok for _, ok in self.module_bars())

    def to_markdown(self) -> str:
        r = self.report
        singles = r.singles
        mean_single = sum(s.fraction for s in singles) / len(singles) if singles else float("nan")
        epochs = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        lines = [
            f"**{self.model} on {self.data}, {epochs}** ({r.full_weights:,} weights; τ = {r.tau})",
            "",
            "| | test accuracy |",
            "|---|---|",
            f"| plain training (cross-entropy) | {100 * self.accuracy_plain:.2f} % |",
            f"| MODA training (full model) | {100 * self.accuracy_moda:.2f} % |",
        ]
        if r.composed_accuracy is not None:
            lines.append(f"| MODA: all single-class modules composed | {100 * r.composed_accuracy:.2f} % |")
        lines += ["", "Modules of the MODA-trained model (no fine-tuning):", "", r.to_markdown(), ""]
        lines += ["| | ours | MODA, VGG16 / CIFAR-10 (published) |", "|---|---|---|",
                  f"| weights of a single-class module (mean) | {100 * mean_single:.1f} % | "
                  f"{100 * PUBLISHED['weights_fraction']:.1f} % |"]
        if r.overlap_jaccard is not None:
            lines.append(f"| overlap between single-class modules: mean Jaccard of kept weights | "
                         f"{100 * r.overlap_jaccard:.1f} % | {100 * PUBLISHED['overlap']:.1f} % (definition "
                         "as published) |")
            lines.append(f"| overlap: mean shared weights, fraction of the full model | "
                         f"{100 * r.overlap_shared:.1f} % | |")
        lines += [f"| accuracy, MODA-trained / plain | {100 * self.accuracy_moda:.2f} % / "
                  f"{100 * self.accuracy_plain:.2f} % | {100 * PUBLISHED['accuracy_moda']:.2f} % / "
                  f"{100 * PUBLISHED['accuracy_reference']:.2f} % |",
                  f"| single-class module of the *plain* model (mean) | {100 * self.plain_single_fraction:.1f} % | |",
                  "", f"Bars: full model within 1 point of plain: {'met' if self.full_within_1_point else 'NOT met'}; "
                  f"every module within 2 points at ≤ 30 % of the weights: "
                  f"{'met' if all(ok for _, ok in self.module_bars()) else 'NOT met'} "
                  f"({', '.join(','.join(map(str, c)) for c, ok in self.module_bars() if not ok) or 'all pass'}). "
                  f"{self.seconds:.0f} s."]
        return "\n".join(lines)


def _load(data: str, data_root: str | None, seed: int) -> tuple[torch.Tensor, ...]:
    if data == "digits":
        return load_digits(seed=seed)
    if data_root is None:
        raise ValueError("moda_demo: --data cifar10 needs --data-root (the directory of the extracted archive)")
    x, y = load_cifar10(data_root, train=True, normalize=True)
    x_test, y_test = load_cifar10(data_root, train=False, normalize=True)
    return x, y, x_test, y_test


def _train(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
           y: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int, desc: str, progress: bool,
           augment: bool) -> None:
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, len(y) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", disable=not progress, leave=False)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size].to(y.device)
            xb = x[idx]
            if augment:  # CIFAR: random horizontal flips
                flip = torch.rand(len(idx), generator=generator).to(x.device) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(xb, y[idx]).backward()
            optimizer.step()
            schedule.step()
            bar.update()
    bar.close()
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.cat([model(c).argmax(1) for c in x.split(1024)])
    return float((pred == y).float().mean())


def run(data: str = "digits", *, model: str = "cnn", data_root: str | None = None, epochs: int | None = None,
        seed: int = 0, width: int | None = None, tau: float = 0.9, min_keep: float = 0.005, batch_size: int = 64,
        lr: float = 2e-3, affinity: float = 1.0, dispersion: float = 1.0, compactness: float = 0.3,
        pairs: tuple[tuple[int, int], ...] = DEFAULT_PAIRS, device: str | torch.device = "cpu",
        progress: bool = True) -> DemoResult:
    """Train plain and MODA, extract the single-class modules and ``pairs``, and measure them."""
    if data not in ("digits", "cifar10"):
        raise ValueError(f"moda_demo: expected data to be 'digits' or 'cifar10', got {data!r}")
    if model not in ("cnn", "resnet"):
        raise ValueError(f"moda_demo: expected model to be 'cnn' or 'resnet', got {model!r}")
    start = time.perf_counter()
    x, y, x_test, y_test = (t.to(device) for t in _load(data, data_root, seed))
    num_classes = int(max(y.max(), y_test.max())) + 1
    torch.manual_seed(seed)
    epochs = (40 if data == "digits" else 60) if epochs is None else epochs
    net: nn.Module
    if model == "resnet":
        width = 32 if width is None else width
        net = digits_resnet_moda(width, num_classes=num_classes, in_channels=x.shape[1])
        name = f"digits_resnet_moda(width={width})"
    elif data == "digits":
        net = digits_cnn(32 if width is None else width, num_classes=num_classes)
        name = f"digits_cnn(width={32 if width is None else width})"
    else:
        net = vgg16(num_classes=num_classes, width=64 if width is None else width)
        name = f"vgg16(width={64 if width is None else width})"
    net = net.to(device)
    plain, moda = net, copy.deepcopy(net)
    augment = data == "cifar10"
    _train(plain, lambda xb, yb: F.cross_entropy(plain(xb), yb), x, y, epochs, batch_size, lr, seed, "plain",
           progress, augment)
    criterion = MODALoss(moda, affinity=affinity, dispersion=dispersion, compactness=compactness)
    _train(moda, lambda xb, yb: criterion(xb, yb).loss, x, y, epochs, batch_size, lr, seed, "MODA", progress, augment)
    accuracy_plain, accuracy_moda = _accuracy(plain, x_test, y_test), _accuracy(moda, x_test, y_test)

    masks = class_masks(moda, (x, y), tau=tau, min_keep=min_keep)
    known = masks.classes
    class_sets: list[tuple[int, ...]] = [(c,) for c in known]
    class_sets += [p for p in pairs if all(c in known for c in p)]
    report = modularity_report(moda, masks, class_sets, x_test, y_test)
    plain_masks = class_masks(plain, (x, y), tau=tau, min_keep=min_keep)
    plain_fraction = sum(count_weights(extract(plain, c, plain_masks)) for c in plain_masks.classes) / \
        len(plain_masks.classes) / count_weights(plain)
    return DemoResult(data, name, epochs, accuracy_plain, accuracy_moda, report, plain_fraction,
                      time.perf_counter() - start)


NUM_CLASSES = 10  # digits and CIFAR-10


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class pair like 3,8, got {text!r}") from None
    if a == b or not (0 <= a < NUM_CLASSES and 0 <= b < NUM_CLASSES):
        raise argparse.ArgumentTypeError(f"expected a pair of two different classes in 0..{NUM_CLASSES - 1} "
                                         f"like 3,8, got {text!r}")
    return a, b


def main(argv: list[str] | None = None, prog: str | None = None) -> DemoResult:
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(__doc__),
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data", choices=("digits", "cifar10"), default="digits", help="the data set")
    parser.add_argument("--model", choices=("cnn", "resnet"), default="cnn",
                        help="cnn: digits_cnn (digits) or VGG16 (CIFAR-10); resnet: digits_resnet_moda")
    parser.add_argument("--data-root", help="CIFAR-10: the directory holding the extracted archive")
    parser.add_argument("--epochs", type=positive_int, help="training epochs (default: 40 digits, 60 CIFAR-10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and shuffling")
    parser.add_argument("--width", type=positive_int,
                        help="model width (default: 32 digits_cnn and digits_resnet_moda, 64 VGG16)")
    parser.add_argument("--tau", type=positive_float_at_most(1.0), default=0.9,
                        help="activation-frequency threshold of the masks")
    parser.add_argument("--min-keep", type=fraction, default=0.005, help="smallest fraction of a layer kept")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="samples per step")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate (Adam, one-cycle)")
    parser.add_argument("--pairs", type=_pair, nargs="*", default=list(DEFAULT_PAIRS),
                        help="class pairs whose modules to extract, e.g. 3,8 4,9")
    parser.add_argument("--device", default="cpu", help="where to train (e.g. cuda)")
    parser.add_argument("--out", help="write the report (markdown) to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.data == "cifar10" and not args.data_root:
        raise UsageError("--data cifar10 needs --data-root (the folder of the extracted archive; nothing is "
                         "downloaded)")
    check_device(args.device)
    if args.out:
        output_path("--out", args.out)
    result = run(args.data, model=args.model, data_root=args.data_root, epochs=args.epochs, seed=args.seed,
                 width=args.width, tau=args.tau, min_keep=args.min_keep, batch_size=args.batch_size, lr=args.lr,
                 pairs=tuple(args.pairs), device=args.device, progress=not args.no_progress)
    text = result.to_markdown()
    print(text)
    if args.out:
        make_parents(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
