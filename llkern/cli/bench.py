"""llkern bench: time llkern's fused ops against plain eager PyTorch on this machine, forward + backward.

Each op runs on fresh random inputs of the size given by --size; the table shows the median time of
llkern's op (the compiled kernel where one is built for the device, else its PyTorch reference), of
the same computation written plainly in PyTorch, and their ratio. The full benchmarks, with
torch.compile, peers and floors, are in the repository's bench/ folder (make bench, bench/gpu_check.sh).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llkern.cli.options import HelpFormatter, UsageError, check_device, plain_text

__all__ = ["OPS", "SIZES", "BenchRow", "main", "run"]

# per size: transport elements, aux head (B, C, H, W, classes), similarity (N, d)
SIZES = {
    "small": {"transport": 2**20, "aux_head": (128, 64, 8, 8, 10), "similarity": (512, 128)},
    "medium": {"transport": 2**24, "aux_head": (1024, 64, 8, 8, 10), "similarity": (4096, 128)},
}
OPS = ("transport_penalty", "aux_head_loss", "info_nce", "supcon_loss")


@dataclass
class BenchRow:
    op: str
    shape: str
    llkern_ms: float
    eager_ms: float

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.llkern_ms


def _cases(size: str, device: torch.device, dtype: torch.dtype) -> dict[str, tuple[str, Callable, Callable]]:
    import llkern.functional as LF

    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)

    n = SIZES[size]["transport"]
    y, x = randn(n), randn(n, grad=False)
    b, c, h, w, classes = SIZES[size]["aux_head"]
    features, weight, bias = randn(b, c, h, w), randn(classes, c), randn(classes)
    target = torch.randint(0, classes, (b,), generator=g).to(device)
    m, d = SIZES[size]["similarity"]
    z1, z2 = randn(m, d), randn(m, d)
    labels = torch.randint(0, 10, (m,), generator=g).to(device)

    def eager_info_nce() -> torch.Tensor:
        s = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T / 0.07
        return F.cross_entropy(s, torch.arange(m, device=device))

    def eager_supcon() -> torch.Tensor:
        zn = F.normalize(z, dim=1)
        s = (zn @ zn.T / 0.07).float()
        self_mask = torch.eye(m, dtype=torch.bool, device=device)
        log_prob = s - torch.logsumexp(s.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
        positive = (labels[:, None] == labels[None, :]) & ~self_mask
        return -((log_prob * positive).sum(1) / positive.sum(1).clamp(min=1)).mean()

    z = z1
    return {
        "transport_penalty": (f"{n}", lambda: LF.transport_penalty(y, x, 1.0),
                              lambda: (y - x).float().square().mean() / 2.0),
        "aux_head_loss": (f"{b}x{c}x{h}x{w}->{classes}", lambda: LF.aux_head_loss(features, weight, bias, target),
                          lambda: F.cross_entropy(F.linear(features.mean((2, 3)), weight, bias).float(), target)),
        "info_nce": (f"N={m} d={d}", lambda: LF.info_nce(z1, z2), eager_info_nce),
        "supcon_loss": (f"N={m} d={d}", lambda: LF.supcon_loss(z, labels), eager_supcon),
    }


def _time(fn: Callable[[], torch.Tensor], min_run_time: float) -> float:
    from torch.utils import benchmark

    def step() -> None:
        fn().backward()

    step()  # warm-up: kernels loaded, caches filled
    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    return 1e3 * timer.blocked_autorange(min_run_time=min_run_time).median


def run(ops: list[str], size: str = "small", device: str = "cpu", dtype: torch.dtype = torch.float32,
        min_run_time: float = 0.5, progress: bool = True) -> list[BenchRow]:
    """Time every op in ``ops``: llkern against eager PyTorch, forward + backward, median ms."""
    from tqdm import tqdm

    cases = _cases(size, torch.device(device), dtype)
    rows = []
    for op in tqdm(ops, desc="bench", disable=not progress, leave=False):
        shape, fused, eager = cases[op]
        rows.append(BenchRow(op, shape, _time(fused, min_run_time), _time(eager, min_run_time)))
    return rows


def main(argv: list[str] | None = None, prog: str | None = "llkern bench") -> list[BenchRow]:
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="the ops to time")
    parser.add_argument("--size", choices=tuple(SIZES), default="small", help="input sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="input dtype")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    device = check_device(args.device)
    if args.min_time <= 0:
        raise UsageError(f"--min-time: expected a number > 0, got {args.min_time}")
    rows = run(args.ops, args.size, str(device), getattr(torch, args.dtype), args.min_time, not args.no_progress)
    print(f"{'op':<18} {'shape':<20} {'llkern ms':>10} {'eager ms':>10} {'speed-up':>9}   ({device}, {args.dtype})")
    for row in rows:
        print(f"{row.op:<18} {row.shape:<20} {row.llkern_ms:>10.3f} {row.eager_ms:>10.3f} {row.speedup:>8.2f}x")
    return rows
