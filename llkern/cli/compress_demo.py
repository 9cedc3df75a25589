"""MIRACLE compression of a LeNet-5 on digits, end to end: train, encode, decode, evaluate.

    llkern compress [--out digits-lenet.mira] [--bits 10] [--block-size 72] ...

1. Train the uncompressed model (:func:`llkern.models.digits_lenet_caffe`, float32) and measure
   its test accuracy.
2. Make its Linear/Conv2d weights Mean-KL variational (:class:`llkern.compress.mean_kl.MeanKLNetwork`,
   every block of ``--block-size`` weights exactly ``--bits`` bits of KL), starting from the
   trained weights, and train.
3. Code it (:func:`llkern.compress.miracle.encode`), retraining the blocks not yet coded after every chunk.
4. Rebuild an ordinary ``nn.Module`` from the file alone (:func:`llkern.compress.miracle.decode`) and
   measure its test accuracy.

The target: a file of at most 1/200 of the float32 weights, and test accuracy within 2
points of the uncompressed model.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from llkern.cli.options import (
    HelpFormatter,
    UsageError,
    check_device,
    fraction,
    int_between,
    make_parents,
    nonnegative_int,
    output_path,
    plain_text,
    positive_int,
)
from llkern.compress import miracle
from llkern.compress.mean_kl import MAX_WEIGHTS_PER_BIT, MeanKLNetwork
from llkern.data.images import load_digits
from llkern.models import digits_lenet_caffe
from llkern.ops.miracle_encode import MAX_BITS

__all__ = ["CompressionResult", "main", "run"]


@dataclass
class CompressionResult:
    """What :func:`run` measured."""

    weights: int
    float32_bytes: int
    file_bytes: int
    ratio: float
    accuracy_uncompressed: float
    accuracy_posterior_mean: float
    accuracy_decoded: float
    seconds: float

    @property
    def meets_target(self) -> bool:
        """The file ≤ 1/200 of the float32 weights, decoded accuracy within 2 points."""
        return self.ratio >= 200 and self.accuracy_decoded >= self.accuracy_uncompressed - 0.02


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:  # epochs of shuffled indices
        for batch in torch.randperm(n, generator=generator).split(batch_size):
            if len(batch) == batch_size:
                yield batch


def _accuracy(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _train(step: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer, batches, steps: int,
           desc: str, progress: bool, schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    for _ in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        optimizer.zero_grad(set_to_none=True)
        step(next(batches)).backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()


def run(out: str | Path, *, bits: int = 10, block_size: int = 72, pretrain_steps: int = 1500,
        steps: int = 3000, retrain_steps: int = 30, chunk_blocks: int = 32, lr: float = 1e-3,
        variational_lr: float = 2e-2, budget_lr: float = 5e-2, retrain_fraction: float = 0.1, batch_size: int = 64,
        choose: str = "argmax", seed: int = 0, impl: str = "auto", device: str | torch.device = "cpu",
        progress: bool = True) -> CompressionResult:
    """Train, compress, decode and evaluate; the file is written to ``out``.

    Args:
        out: the MIRACLE file to write.
        bits, block_size: C bits per coding block of ``block_size`` weights.
        pretrain_steps: Adam steps (``lr``) of the uncompressed model.
        steps: Adam steps of the Mean-KL model, the learning rates decayed to 0 on a cosine:
            ``variational_lr`` for θ (the means) and ρ (the priors), ``budget_lr`` for γ (how each
            block's budget is split among its weights, which has to move further).
        retrain_steps: steps on the blocks not yet coded after each chunk of ``chunk_blocks``, at
            ``retrain_fraction`` of the peak learning rates.
        batch_size, choose, seed: batches, the encoder's choice, and the seed of everything.
        impl: of the Triton ops this uses, Mean-KL sampling and the encoder's candidate scoring
            (``"auto"``: the kernels where Triton runs, else the references).
        device: where to train and encode (on a GPU the Triton kernels sample and score); the
            decoded model is evaluated on the CPU, as a user of the file would.
        progress: progress bars.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    x, y, x_test, y_test = load_digits(seed=seed)
    x_cpu, y_cpu = x_test, y_test
    x, y, x_test, y_test = (t.to(device) for t in (x, y, x_test, y_test))
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(len(y), batch_size, generator)

    model = digits_lenet_caffe().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    _train(lambda i: F.cross_entropy(model(x[i]), y[i]), optimizer, batches, pretrain_steps, "uncompressed",
           progress)
    model.eval()
    accuracy_uncompressed = _accuracy(model, x_test, y_test)

    net = MeanKLNetwork(model.cpu(), bits_per_block=bits, block_size=block_size, seed=seed, impl=impl).to(device)

    def groups(scale: float) -> list[dict]:
        return [{"params": [net.theta, net.log_rho], "lr": scale * variational_lr},
                {"params": [net.gamma], "lr": scale * budget_lr}]

    variational = torch.optim.Adam(groups(1.0))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(variational, max(steps, 1))
    net.train()
    _train(lambda i: F.cross_entropy(net(x[i]), y[i]), variational, batches, steps, "Mean-KL", progress,
           schedule)
    net.eval()
    accuracy_posterior_mean = _accuracy(net, x_test, y_test)

    retraining = torch.optim.Adam(groups(retrain_fraction))

    def retrain(coding: nn.Module) -> None:
        coding.train()
        _train(lambda i: F.cross_entropy(coding(x[i]), y[i]), retraining, batches, retrain_steps, "retrain", False)
        coding.eval()

    report = miracle.encode(net, out, choose=choose, chunk_blocks=chunk_blocks,
                            retrain=retrain if retrain_steps > 0 else None, impl=impl, progress=progress)
    decoded = miracle.decode(out).eval()
    accuracy_decoded = _accuracy(decoded, x_cpu, y_cpu)
    return CompressionResult(weights=sum(net.sizes), float32_bytes=report.float32_bytes, file_bytes=report.file_bytes,
                             ratio=report.ratio, accuracy_uncompressed=accuracy_uncompressed,
                             accuracy_posterior_mean=accuracy_posterior_mean, accuracy_decoded=accuracy_decoded,
                             seconds=time.perf_counter() - start)


def main(argv: list[str] | None = None, prog: str | None = None) -> CompressionResult:
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(__doc__),
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", default="digits-lenet.mira", help="the MIRACLE file to write")
    parser.add_argument("--bits", type=int_between(1, MAX_BITS), default=10, help="C, bits per coding block")
    parser.add_argument("--block-size", type=positive_int, default=72,
                        help=f"weights per coding block (at most {MAX_WEIGHTS_PER_BIT} per bit)")
    parser.add_argument("--pretrain-steps", type=nonnegative_int, default=1500,
                        help="plain training steps before the Mean-KL training")
    parser.add_argument("--steps", type=nonnegative_int, default=3000, help="Mean-KL training steps")
    parser.add_argument("--retrain-steps", type=nonnegative_int, default=30,
                        help="steps after each coded chunk (0: none)")
    parser.add_argument("--chunk-blocks", type=positive_int, default=32, help="blocks coded between retrainings")
    parser.add_argument("--retrain-fraction", type=fraction, default=0.1,
                        help="retraining learning rates as a fraction of the peak ones")
    parser.add_argument("--choose", choices=miracle.CHOICES, default="argmax",
                        help="the candidate of best score, or one sampled by its weight")
    parser.add_argument("--seed", type=int_between(0, 2**32 - 1), default=0,
                        help="seed of training and of the shared random stream")
    parser.add_argument("--impl", choices=("auto", "kernel", "reference"), default="auto",
                        help="Mean-KL sampling and candidate scoring: the Triton kernels or the references")
    parser.add_argument("--device", default="cpu", help="where to train and encode (e.g. cuda)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    # everything that can fail before minutes of training fails now
    if args.block_size > MAX_WEIGHTS_PER_BIT * args.bits:
        raise UsageError(f"--block-size {args.block_size}: at most {MAX_WEIGHTS_PER_BIT} weights per coded bit, "
                         f"{MAX_WEIGHTS_PER_BIT * args.bits} at --bits {args.bits}")
    check_device(args.device)
    output_path("--out", args.out)
    if args.json:
        output_path("--json", args.json)
        if Path(args.json).expanduser().resolve() == Path(args.out).expanduser().resolve():
            raise UsageError(f"--json {args.json}: the same file as --out")
    result = run(make_parents(args.out), bits=args.bits, block_size=args.block_size, pretrain_steps=args.pretrain_steps,
                 steps=args.steps, retrain_steps=args.retrain_steps, chunk_blocks=args.chunk_blocks,
                 retrain_fraction=args.retrain_fraction,
                 choose=args.choose, seed=args.seed, impl=args.impl, device=args.device, progress=not args.no_progress)
    print(f"LeNet-5-Caffe for digits, {result.weights} weights: {result.float32_bytes} bytes in float32")
    print(f"MIRACLE file {args.out}: {result.file_bytes} bytes, {result.ratio:.0f}× smaller "
          f"({args.bits} bits per block of {args.block_size})")
    print(f"test accuracy: uncompressed {100 * result.accuracy_uncompressed:.2f} %, Mean-KL posterior mean "
          f"{100 * result.accuracy_posterior_mean:.2f} %, decoded from the file {100 * result.accuracy_decoded:.2f} %")
    print(f"target (≥ 200×, within 2 points): {'met' if result.meets_target else 'NOT met'}; "
          f"{result.seconds:.0f} s in all")
    if args.json:
        figures = {**asdict(result), "meets_target": result.meets_target}
        make_parents(args.json).write_text(json.dumps(figures, indent=1))
    return result


if __name__ == "__main__":
    main()
