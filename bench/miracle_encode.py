"""MIRACLE encoder throughput: coding blocks per second (candidates generated from the Philox stream
and scored, a chunk of blocks at a time), for C bits per block and the block size given.

    python bench/miracle_encode.py [--bits 10] [--block-size 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from llkern.compress.mean_kl import MeanKLNetwork
from llkern.compress.miracle import encode
from llkern.models import digits_lenet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = MeanKLNetwork(digits_lenet(), bits_per_block=args.bits, block_size=args.block_size, impl="reference")
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        report = encode(net, Path(folder) / "lenet.llkm", progress=False)
        seconds = time.perf_counter() - start
    candidates = report.num_blocks * 2**args.bits
    print(f"{report.num_blocks} blocks of {args.block_size} weights, {args.bits} bits: {seconds:.1f} s, "
          f"{report.num_blocks / seconds:.0f} blocks/s, {candidates * args.block_size / seconds / 1e6:.1f} M "
          f"candidate weights/s; file {report.file_bytes} bytes ({report.ratio:.0f}× smaller than float32)")


if __name__ == "__main__":
    main()
