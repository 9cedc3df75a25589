"""CPU benchmark of the compiled BatchNorm + ReLU (batch_norm_relu, batch_norm_relu_backward) against
PyTorch's BatchNorm and ReLU, torch.compile and llkern's PyTorch-op recomputation, in training mode.

    OMP_NUM_THREADS=2 python bench/bench_batch_norm_relu.py [--shape 64 256 32 32] [--repeats 15]

Two tables: forward + backward of relu(BN(x)) with the bytes each saves, and the backward alone given
the statistics (ATen's native_batch_norm_backward after ReLU's threshold_backward, against the one
compiled op that recomputes the mask inside BN's backward).

Floor (N float32 elements): the compiled backward reads x and the gradient twice (a reduction pass,
then the pass writing grad_x): 20 N bytes; the forward reads x for the statistics and again for the
output, which it writes: 12 N. ATen's backward path needs the BN output or the ReLU output saved and
reads and writes intermediate gradients. The copy row gives the bandwidth (8 N bytes per copy).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import append_result, machine, median_ms

import llkern.nn.activation_memory as activation_memory
from llkern.local.memory import MemoryMeter


def eager(x, weight, bias):
    return torch.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5))


def llkern_path(kernels: bool):
    def run(x, weight, bias):
        previous = activation_memory.kernel_available
        if not kernels:
            activation_memory.kernel_available = lambda op, device_type: False
        try:
            return activation_memory.batch_norm_relu(x, None, None, weight, bias, True, 0.0, 1e-5)
        finally:
            activation_memory.kernel_available = previous
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 256, 32, 32])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = torch.randn(args.shape).to(memory_format=fmt).requires_grad_()
    channels = args.shape[1]
    weight = (torch.rand(channels) + 0.5).requires_grad_()
    bias = torch.randn(channels).mul_(0.1).requires_grad_()
    grad = torch.randn(args.shape).to(memory_format=fmt)
    params = (x, weight, bias)
    n = x.numel()

    src, dst = torch.randn(n), torch.empty(n)
    copy_ms = median_ms(lambda: dst.copy_(src), args.repeats)[0]
    bandwidth = 8 * n / (copy_ms * 1e-3)

    def step(fn):
        def run():
            fn(x, weight, bias).backward(grad)
            for p in params:
                p.grad = None
        return run

    def saved(fn):
        with MemoryMeter(exclude=[weight, bias]) as meter:
            y = fn(x, weight, bias)
        del y
        return meter.peak_saved_bytes

    candidates = [("BN + ReLU (eager)", eager), ("torch.compile(BN + ReLU)", torch.compile(eager)),
                  ("llkern, PyTorch-op recompute", llkern_path(False)),
                  ("llkern batch_norm_relu (kernel)", llkern_path(True))]
    shape = "×".join(map(str, args.shape)) + (" channels_last" if args.channels_last else "")
    header = (f"{shape} float32, training, {torch.get_num_threads()} threads, {machine()['device']}, "
              f"torch {torch.__version__}; copy {bandwidth / 1e9:.1f} GB/s")
    floor_fb = (12 + 20) * n / bandwidth * 1e3
    print(f"relu(BN(x)) forward + backward, {header}, floor {floor_fb:.2f} ms\n")
    print("| impl | ms (min–max) | vs eager | vs PyTorch-op recompute | vs floor | saved for backward |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, fn in candidates:
        median, low, high = median_ms(step(fn), args.repeats)
        rows.append((name, median, low, high, saved(fn)))
    for name, median, low, high, saved_bytes in rows:
        print(f"| {name} | {median:.2f} ({low:.2f}–{high:.2f}) | {median / rows[0][1]:.2f}× | "
              f"{median / rows[2][1]:.2f}× | {median / floor_fb:.2f}× | {saved_bytes / 2**20:.1f} MiB |")
        append_result({"op": "batch_norm_relu fwd+bwd", "shape": args.shape, "dtype": "float32",
                       "channels_last": args.channels_last, "impl": name, "median_ms": median, "min_ms": low,
                       "max_ms": high, "saved_bytes": saved_bytes, "floor_ms": floor_fb})

    # Backward only, the statistics given.
    with torch.no_grad():
        xd = x.detach()
        mean, var = torch.batch_norm_update_stats(xd, None, None, 0.0)
        invstd = torch.rsqrt(var + 1e-5)
        y = torch.relu(F.batch_norm(xd, None, None, weight, bias, True, 0.0, 1e-5))

    def aten_backward():
        grad_z = torch.ops.aten.threshold_backward(grad, y, 0)
        torch.ops.aten.native_batch_norm_backward(grad_z, xd, weight, None, None, mean, invstd, True, 1e-5,
                                                  [True, True, True])

    def kernel_backward():
        torch.ops.llkern.batch_norm_relu_backward(grad, xd, weight, bias, mean, invstd, True, True)

    floor_b = 20 * n / bandwidth * 1e3
    print(f"\nbackward only (statistics given), {header}, floor {floor_b:.2f} ms\n")
    print("| impl | ms (min–max) | vs ATen | vs floor |")
    print("|---|---|---|---|")
    results = [("ATen threshold_backward + native_batch_norm_backward (needs y saved)", median_ms(aten_backward,
                                                                                                 args.repeats)),
               ("llkern batch_norm_relu_backward (recomputes the mask)", median_ms(kernel_backward, args.repeats))]
    for name, (median, low, high) in results:
        print(f"| {name} | {median:.2f} ({low:.2f}–{high:.2f}) | {median / results[0][1][0]:.2f}× | "
              f"{median / floor_b:.2f}× |")
        append_result({"op": "batch_norm_relu backward", "shape": args.shape, "dtype": "float32",
                       "channels_last": args.channels_last, "impl": name, "median_ms": median, "min_ms": low,
                       "max_ms": high, "floor_ms": floor_b})


if __name__ == "__main__":
    main()
