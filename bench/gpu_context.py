"""GPU benchmark of the context-supply add (ContSup), forward and forward + backward.

Shape (issue 5): h 64×256×64×64 plus avgpool2 of a 64×256×128×128 context, fp32 and bf16, and
the same with a second, s = 1 context. Against eager PyTorch (``h + F.avg_pool2d(c, 2)``) and
torch.compile; achieved bandwidth against the machine's copy bandwidth. Appends rows to
bench/results/results.jsonl.

Floor: forward reads h (64 MiB fp32) and c (256 MiB) and writes out (64 MiB): 384 MiB; backward
reads g (64 MiB) and writes d c (256 MiB). At 3.0 TB/s (H100): 0.13 ms and 0.11 ms.

    python bench/gpu_context.py [--dry-run]   # --dry-run: h 2×3×7×5 on the CPU (Triton interpreted), nothing written
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_dry_run_argument,
    append_result,
    bench_device,
    dry_run,
    empty_cache,
    first_line,
    require_device,
    set_dry_run,
    time_ms,
)
from gpu_transport import copy_bandwidth

import llkern

H_SHAPE = (64, 256, 64, 64)  # h: (B, C, H, W); each context is (B, C, s·H, s·W)
DRY_H_SHAPE = (2, 3, 7, 5)  # --dry-run

def eager(h, *contexts):
    out = h
    for c in contexts:
        s = c.shape[2] // h.shape[2]
        out = out + (c if s == 1 else F.avg_pool2d(c, s))
    return out


def bench_case(dtype: torch.dtype, scales: tuple[int, ...], variants: dict, bandwidth: float,
               shape: tuple[int, int, int, int] = H_SHAPE) -> None:
    batch, channels, height, width = shape
    h = torch.randn(shape, device=bench_device(), dtype=dtype)
    contexts = [torch.randn(batch, channels, height * s, width * s, device=bench_device(), dtype=dtype,
                            requires_grad=True) for s in scales]
    gradient = torch.randn_like(h)
    size = h.element_size()
    forward_bytes = size * (2 * h.numel() + sum(c.numel() for c in contexts))
    backward_bytes = size * (h.numel() + sum(c.numel() for c in contexts))
    for label, fn in variants.items():
        def forward(fn=fn):
            with torch.no_grad():
                fn(h, *contexts)

        def both(fn=fn):
            fn(h, *contexts).backward(gradient)
            for c in contexts:
                c.grad = None

        for name, step, nbytes in (("forward", forward, forward_bytes),
                                   ("forward+backward", both, forward_bytes + backward_bytes)):
            try:
                ms, iqr = time_ms(step, reps=20, warmup=3)
            except Exception as error:  # one variant (torch.compile, say) failing costs its row, not the run's
                print(f"{label} {name} failed on {scales}, {dtype}: {first_line(error)}")
                for c in contexts:
                    c.grad = None
                empty_cache()
                continue
            rate = nbytes / ms / 1e6
            append_result({"op": f"context_add {name}", "shape": [*shape, *scales],
                           "dtype": str(dtype).removeprefix("torch."), "impl": label, "median_ms": ms,
                           "iqr_ms": iqr, "GBps": rate, "of_copy": rate / bandwidth})
            print(f"| {scales} | {str(dtype).removeprefix('torch.')} | {name} | {label} | {ms:.3f} | "
                  f"{rate:.0f} | {100 * rate / bandwidth:.0f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dry_run_argument(parser)
    set_dry_run(parser.parse_args().dry_run)
    require_device()
    shape = DRY_H_SHAPE if dry_run() else H_SHAPE
    bandwidth = copy_bandwidth(333 if dry_run() else 1 << 28)
    print(f"copy bandwidth {bandwidth:.0f} GB/s")
    variants = {"llkern": lambda h, *c: llkern.context_add(h, *c, impl="kernel"), "eager": eager,
                "torch.compile": torch.compile(eager)}
    print("| contexts | dtype | pass | impl | ms | GB/s | of copy |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for scales in ((2,), (2, 1)):
            bench_case(dtype, scales, variants, bandwidth, shape)


if __name__ == "__main__":
    main()
