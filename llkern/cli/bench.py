"""llkern bench: time llkern's fused ops against plain eager PyTorch on this machine, forward + backward.

Each op runs on fresh random inputs of the size given by --size; the table shows the median time of
llkern's op and of the same computation written plainly in PyTorch, their ratio, and which path llkern
took: its compiled kernel for the device ("kernel", built into llkern._C) or its PyTorch reference
("reference", when the extension or the device's kernel is missing). The full benchmarks, with
torch.compile, peers and floors, are in the repository's bench/ folder (make bench, bench/gpu_check.sh).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llkern.cli.options import HelpFormatter, check_device, plain_text, positive_float_at_most

__all__ = ["OPS", "SIZES", "BenchRow", "main", "run"]

# per size: transport elements, aux head (B, C, H, W, classes), similarity (N, d), activations (B, C, H, W)
SIZES = {
    "small": {"transport": 2**20, "aux_head": (128, 64, 8, 8, 10), "similarity": (512, 128),
              "activation": (16, 64, 16, 16)},
    "medium": {"transport": 2**24, "aux_head": (1024, 64, 8, 8, 10), "similarity": (4096, 128),
               "activation": (64, 256, 32, 32)},
}
OPS = ("transport_penalty", "aux_head_loss", "info_nce", "supcon_loss", "renyi_mutual_information",
       "relu_with_mask", "batch_norm_relu")
# More than a minute per measurement makes a run of every op take a quarter of an hour; infinity never ends.
MAX_MIN_TIME = 60.0


@dataclass
class BenchRow:
    op: str
    shape: str
    llkern_ms: float
    eager_ms: float
    path: str = "kernel"  # what llkern ran: "kernel" (llkern._C) or "reference" (its PyTorch code)

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.llkern_ms


@dataclass
class _Case:
    shape: str
    fused: Callable[[], torch.Tensor]
    eager: Callable[[], torch.Tensor]
    grad: torch.Tensor | None = None  # the output's gradient, for an op whose output is not a scalar
    inputs: tuple[torch.Tensor, ...] = ()  # the tensors whose gradients both computations form


def _case(op: str, size: str, device: torch.device, dtype: torch.dtype) -> _Case:
    """The inputs and both computations of ``op``, built only when it is timed (medium inputs are large)."""
    case = _build_case(op, size, device, dtype, made := [])
    case.inputs = tuple(t for t in made if t.requires_grad)
    return case


def _build_case(op: str, size: str, device: torch.device, dtype: torch.dtype, made: list[torch.Tensor]) -> _Case:
    import llkern.functional as LF

    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, grad: bool = True) -> torch.Tensor:
        made.append(torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad))
        return made[-1]

    def wide(t: torch.Tensor) -> torch.Tensor:  # the ops' float32 accumulation (float64 kept)
        return t if t.dtype == torch.float64 else t.float()

    if op == "transport_penalty":
        n = SIZES[size]["transport"]
        y, x = randn(n), randn(n, grad=False)
        return _Case(f"{n}", lambda: LF.transport_penalty(y, x, 1.0), lambda: wide(y - x).square().mean() / 2.0)
    if op == "aux_head_loss":
        b, c, h, w, classes = SIZES[size]["aux_head"]
        features, weight, bias = randn(b, c, h, w), randn(classes, c), randn(classes)
        target = torch.randint(0, classes, (b,), generator=g).to(device)
        return _Case(f"{b}x{c}x{h}x{w}->{classes}", lambda: LF.aux_head_loss(features, weight, bias, target),
                     lambda: F.cross_entropy(wide(F.linear(features.mean((2, 3)), weight, bias)), target))
    if op in ("info_nce", "supcon_loss", "renyi_mutual_information"):
        m, d = SIZES[size]["similarity"]
        z1, z2 = randn(m, d), randn(m, d)
        labels = torch.randint(0, 10, (m,), generator=g).to(device)
        self_mask = torch.eye(m, dtype=torch.bool, device=device)
        shape = f"N={m} d={d}"
        if op == "info_nce":
            def eager_info_nce() -> torch.Tensor:
                s = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T / 0.07
                return F.cross_entropy(s, torch.arange(m, device=device))
            return _Case(shape, lambda: LF.info_nce(z1, z2), eager_info_nce)
        if op == "supcon_loss":
            def eager_supcon() -> torch.Tensor:
                zn = F.normalize(z1, dim=1)
                s = wide(zn @ zn.T / 0.07)
                log_prob = s - torch.logsumexp(s.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
                positive = (labels[:, None] == labels[None, :]) & ~self_mask
                return -((log_prob * positive).sum(1) / positive.sum(1).clamp(min=1)).mean()
            return _Case(shape, lambda: LF.supcon_loss(z1, labels), eager_supcon)
        sigma = float(d) ** 0.5

        def eager_renyi() -> torch.Tensor:
            # I(T; Y) = S(A) + S(B) - S(A, B) with S_2(A) = -log2 ||A / tr A||_F^2 (design.md)
            t = wide(z1)
            a = torch.exp(-torch.cdist(t, t).square() / (2 * sigma**2))
            b = (labels[:, None] == labels[None, :]).float()

            def entropy(k: torch.Tensor) -> torch.Tensor:
                return -torch.log2((k / k.diagonal().sum()).square().sum())
            return entropy(a) + entropy(b) - entropy(a * b)
        return _Case(shape, lambda: LF.renyi_mutual_information(z1, labels, sigma=sigma), eager_renyi)
    b, c, h, w = SIZES[size]["activation"]
    x = randn(b, c, h, w)
    grad = torch.randn(b, c, h, w, generator=g).to(device, dtype)
    shape = f"{b}x{c}x{h}x{w}"
    if op == "relu_with_mask":
        return _Case(shape, lambda: LF.relu_with_mask(x)[0], lambda: F.relu(x), grad)
    if op == "batch_norm_relu":
        from llkern.nn.activation_memory import batch_norm_relu

        weight, bias = randn(c), randn(c)
        return _Case(shape, lambda: batch_norm_relu(x, None, None, weight, bias, True),
                     lambda: F.relu(F.batch_norm(x, None, None, weight, bias, True)), grad)
    raise ValueError(f"llkern bench: expected an op in {OPS}, got {op!r}")


def _path(op: str, device: torch.device) -> str:
    from llkern._ext import kernel_available

    return "kernel" if kernel_available(op, device.type) else "reference"


def _time(fn: Callable[[], torch.Tensor], grad: torch.Tensor | None, min_run_time: float) -> float:
    from torch.utils import benchmark

    def step() -> None:
        fn().backward(grad)

    step()  # warm-up: kernels loaded, caches filled
    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    return 1e3 * timer.blocked_autorange(min_run_time=min_run_time).median


def run(ops: list[str], size: str = "small", device: str = "cpu", dtype: torch.dtype = torch.float32,
        min_run_time: float = 0.5, progress: bool = True) -> list[BenchRow]:
    """Time every op in ``ops``: llkern against eager PyTorch, forward + backward, median ms."""
    from tqdm import tqdm

    rows = []
    for op in tqdm(ops, desc="bench", disable=not progress, leave=False):
        case = _case(op, size, torch.device(device), dtype)
        rows.append(BenchRow(op, case.shape, _time(case.fused, case.grad, min_run_time),
                             _time(case.eager, case.grad, min_run_time), _path(op, torch.device(device))))
        del case  # the next op's inputs replace these
    return rows


def main(argv: list[str] | None = None, prog: str | None = "llkern bench") -> list[BenchRow]:
    parser = argparse.ArgumentParser(prog=prog, description=plain_text(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="the ops to time")
    parser.add_argument("--size", choices=tuple(SIZES), default="small", help="input sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="input dtype")
    parser.add_argument("--min-time", type=positive_float_at_most(MAX_MIN_TIME), default=0.5,
                        help="seconds of timing per measurement")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    device = check_device(args.device)
    rows = run(args.ops, args.size, str(device), getattr(torch, args.dtype), args.min_time, not args.no_progress)
    print(f"{'op':<25} {'shape':<20} {'llkern ms':>10} {'eager ms':>10} {'speed-up':>9}  {'path':<9}"
          f"  ({device}, {args.dtype})")
    for row in rows:
        print(f"{row.op:<25} {row.shape:<20} {row.llkern_ms:>10.3f} {row.eager_ms:>10.3f} {row.speedup:>8.2f}x"
              f"  {row.path:<9}")
    return rows
