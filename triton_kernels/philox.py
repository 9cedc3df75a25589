"""llkern's counter-based random stream in Triton (docs/random.md): Philox-4x32-10 keyed by
``(seed, stream)``, draw n at counter ``(n mod 2^32, n div 2^32, 0, 0)``, normals by Box–Muller's
cosine branch from output words 0 and 1. Bit-identical to llkern.random (NumPy), which the tests
check; the Mean-KL kernels call ``stream_normal`` to regenerate their noise.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Compiled Triton reads a global only if its value is a tl.constexpr (an annotation is not enough;
# the interpreter accepts either).
M0 = tl.constexpr(0xD2511F53)
M1 = tl.constexpr(0xCD9E8D57)
W0 = tl.constexpr(0x9E3779B9)
W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox-4x32 rounds on uint32 tensors; returns the four output words."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + W0
            k1 = k1 + W1
        hi0 = tl.umulhi(c0, M0)
        lo0 = c0 * M0
        hi1 = tl.umulhi(c2, M1)
        lo1 = c2 * M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def stream_words(seed, stream, n):
    """Words 0 and 1 of draws ``n`` (uint64 tensor) of stream ``(seed, stream)`` (uint32 scalars)."""
    c0 = (n & 0xFFFFFFFF).to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    k0 = zero + seed.to(tl.uint32)
    k1 = zero + stream.to(tl.uint32)
    x0, x1, _, _ = philox4x32_10(c0, c1, zero, zero, k0, k1)
    return x0, x1


@triton.jit
def stream_normal(seed, stream, n):
    """Standard normals (float32) of draws ``n`` of stream ``(seed, stream)``."""
    x0, x1 = stream_words(seed, stream, n)
    u0 = ((x0 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24
    u1 = (x1 >> 8).to(tl.float32) * 5.9604644775390625e-08
    return tl.sqrt(-2.0 * tl.log(u0)) * tl.cos(6.283185307179586 * u1)


@triton.jit(do_not_specialize=["seed", "stream", "first"])
def fill_stream(out_x0, out_x1, out_z, seed, stream, first, count, BLOCK: tl.constexpr):
    """Draws first .. first+count−1 of a stream: words 0, 1 (as int64 holding uint32) and normals."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offsets < count
    n = (first + offsets).to(tl.uint64)
    x0, x1 = stream_words(seed, stream, n)
    tl.store(out_x0 + offsets, x0.to(tl.int64), mask=mask)
    tl.store(out_x1 + offsets, x1.to(tl.int64), mask=mask)
    tl.store(out_z + offsets, stream_normal(seed, stream, n), mask=mask)
