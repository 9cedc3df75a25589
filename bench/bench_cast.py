"""CPU benchmark of cast_pooled (saved_tensors_in's conversions) against Tensor.to and a copy.

    OMP_NUM_THREADS=2 python bench/bench_cast.py [--numel 16777216] [--repeats 15]

Floor: one pass reading 4 N and writing 2 N bytes (float32 to bfloat16), or the reverse; the copy row
(8 N bytes) gives the bandwidth. Tensor.to allocates a fresh output each call, whose pages are faulted
in on first touch; cast_pooled writes into llkern's pooled buffers, reused across calls.
"""

from __future__ import annotations

import argparse

import torch
from common import append_result, machine, median_ms

from llkern.ops.cast import cast_pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=64 * 256 * 32 * 32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    n = args.numel
    x32, x16 = torch.randn(n), torch.randn(n).bfloat16()
    dst = torch.empty(n)
    copy_ms = median_ms(lambda: dst.copy_(x32), args.repeats)[0]
    bandwidth = 8 * n / (copy_ms * 1e-3)
    floor_ms = 6 * n / bandwidth * 1e3
    print(f"{n} elements, {torch.get_num_threads()} threads, {machine()['device']}, torch {torch.__version__}; "
          f"copy {bandwidth / 1e9:.1f} GB/s, floor (6 bytes per element) {floor_ms:.2f} ms\n")
    print("| conversion | Tensor.to ms | cast_pooled ms | speed-up | cast_pooled vs floor |")
    print("|---|---|---|---|---|")
    for name, x, dtype in (("float32 → bfloat16", x32, torch.bfloat16), ("bfloat16 → float32", x16, torch.float32)):
        to_ms = median_ms(lambda x=x, dtype=dtype: x.to(dtype), args.repeats)[0]
        pooled_ms = median_ms(lambda x=x, dtype=dtype: cast_pooled(x, dtype), args.repeats)[0]
        print(f"| {name} | {to_ms:.2f} | {pooled_ms:.2f} | {to_ms / pooled_ms:.2f}× | {pooled_ms / floor_ms:.2f}× |")
        for impl, ms in (("Tensor.to", to_ms), ("cast_pooled", pooled_ms)):
            append_result({"op": f"cast {name}", "shape": [n], "impl": impl, "median_ms": ms, "floor_ms": floor_ms})


if __name__ == "__main__":
    main()
