"""CPU benchmark of relu_with_mask + relu_mask_backward against F.relu, torch.compile and the pure-PyTorch
bit packing, forward + backward, with the bytes each saves for the backward.

    OMP_NUM_THREADS=2 python bench/bench_relu_mask.py [--shape 64 256 32 32] [--repeats 15]

Prints a markdown table and appends each row to bench/results/results.jsonl.

Floor (N elements of 4 bytes): the forward reads x and writes y and the mask (8.125 N bytes), the
backward reads the gradient and the mask and writes grad_x (8.125 N): 16.25 N bytes, against 20 N for
ReLU (its backward reads y as well as the gradient). The copy row measures the bandwidth (8 N bytes per
copy); floor = 16.25 N bytes at that bandwidth.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import append_result, machine, median_ms

import llkern.nn.activation_memory as activation_memory
from llkern.local.memory import MemoryMeter
from llkern.ops.relu_mask import relu_with_mask


def fwd_bwd(fn, x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        y = fn(x)
        y.backward(grad)
        x.grad = None
    return run


def saved_bytes(fn, x: torch.Tensor) -> int:
    with MemoryMeter() as meter:
        y = fn(x)
    del y
    return meter.peak_saved_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 256, 32, 32])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    x = torch.randn(args.shape).to(dtype).requires_grad_()
    grad = torch.randn(args.shape).to(dtype)
    n, itemsize = x.numel(), x.element_size()

    src, dst = torch.randn(n).to(dtype), torch.empty(n, dtype=dtype)
    copy_ms = median_ms(lambda: dst.copy_(src), args.repeats)[0]
    bandwidth = 2 * n * itemsize / (copy_ms * 1e-3)  # bytes per second
    floor_ms = (4 * n * itemsize + n / 4) / bandwidth * 1e3

    compiled = torch.compile(F.relu)
    candidates = [
        ("F.relu (eager)", F.relu),
        ("torch.compile(F.relu)", compiled),
        ("llkern, PyTorch-op bit packing", activation_memory._BitMaskReLUFunction.apply),
        ("llkern relu_with_mask (kernel)", lambda t: relu_with_mask(t, impl="kernel")[0]),
    ]
    rows = []
    for name, fn in candidates:
        median, low, high = median_ms(fwd_bwd(fn, x, grad), args.repeats)
        rows.append({"impl": name, "median_ms": median, "min_ms": low, "max_ms": high,
                     "saved_bytes": saved_bytes(fn, x)})
    eager = rows[0]["median_ms"]
    python = rows[2]["median_ms"]
    shape = "×".join(map(str, args.shape))
    print(f"relu fwd+bwd, {shape} {args.dtype}, {torch.get_num_threads()} threads, {machine()['device']}, "
          f"torch {torch.__version__}; copy {bandwidth / 1e9:.1f} GB/s, floor {floor_ms:.2f} ms\n")
    print("| impl | ms (min–max) | vs eager | vs PyTorch-op packing | vs floor | saved for backward |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['impl']} | {row['median_ms']:.2f} ({row['min_ms']:.2f}–{row['max_ms']:.2f}) | "
              f"{row['median_ms'] / eager:.2f}× | {row['median_ms'] / python:.2f}× | "
              f"{row['median_ms'] / floor_ms:.2f}× | {row['saved_bytes'] / 2**20:.2f} MiB |")
        append_result({"op": "relu_with_mask fwd+bwd", "shape": args.shape, "dtype": args.dtype, **row,
                       "floor_ms": floor_ms})


if __name__ == "__main__":
    main()
