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
    # tl.cast, not .to(): under torch.compile Inductor passes an int argument equal to 1 as a constant
    # (do_not_specialize is the Triton launcher's, not Inductor's), and a constant has no .to()
    k0 = zero + tl.cast(seed, tl.uint32)
    k1 = zero + tl.cast(stream, tl.uint32)
    x0, x1, _, _ = philox4x32_10(c0, c1, zero, zero, k0, k1)
    return x0, x1


@triton.jit
def _minus_two_log_u0(x0):
    """−2 ln u0 for u0 = ((x0 >> 8) + 0.5) · 2^-24, to float32 accuracy over the whole range.

    u0 needs 25 bits where it is ≥ 1/2, so float32 cannot hold it there; 1 − u0 = (m' + 0.5) · 2^-24
    with m' = 2^24 − 1 − (x0 >> 8) < 2^23 can. Below 1/2: ln u0 directly (|ln u0| ≥ ln 2, so an
    absolute error of the GPU's log is a small relative one). From 1/2: ln(1 − v) = −2 atanh(v / (2 − v)),
    an odd series in s = v / (2 − v) ≤ 1/3 (terms through s^15: 3^-16 < 2^-25), relative-accurate down
    to v = 2^-25 where ln u0 itself is 3e-8.
    """
    m = x0 >> 8
    low = m < 8388608  # 2^23
    u0 = (m.to(tl.float32) + 0.5) * 5.9604644775390625e-08  # exact where low
    v = ((16777215 - m).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 1 − u0, exact where not low
    s = v / (2.0 - v)
    s2 = s * s
    series = 1.0 / 15.0
    series = series * s2 + 1.0 / 13.0
    series = series * s2 + 1.0 / 11.0
    series = series * s2 + 1.0 / 9.0
    series = series * s2 + 1.0 / 7.0
    series = series * s2 + 1.0 / 5.0
    series = series * s2 + 1.0 / 3.0
    series = series * s2 + 1.0
    near_one = 4.0 * s * series  # −2 ln(1 − v) = 4 atanh(s)
    return tl.where(low, -2.0 * tl.log(tl.where(low, u0, 0.5)), near_one)


@triton.jit
def stream_normal(seed, stream, n):
    """Standard normals (float32) of draws ``n`` of stream ``(seed, stream)``."""
    x0, x1 = stream_words(seed, stream, n)
    # cos(2π u1) = −cos(2π (u1 − 1/2)): u1 − 1/2 is exact, and the argument stays in [−π, π]
    u1 = (x1 >> 8).to(tl.float32) * 5.9604644775390625e-08 - 0.5
    # sqrt_rn: tl.sqrt compiles to sqrt.approx (up to 2 ulp here), which alone could spend the documented
    # budget (docs/random.md) that the interpreter's correctly rounded square root leaves
    return -tl.sqrt_rn(_minus_two_log_u0(x0)) * tl.cos(6.283185307179586 * u1)


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
