"""Triton kernels of the context-supply add (ContSup): ``out = h + Σ_i avgpool_{s_i}(c_i)``.

A 2-D grid: axis 0 is a row of out's memory order (b·C + c in NCHW: H·W contiguous values; b·H + y
in channels_last: W·C), axis 1 a tile of BLOCK values of that row, so loads and stores of h and out
are coalesced and each value's coordinates take one int32 division (its row's are per program, not
per value: three int64 div/mod pairs per value once cost the kernel a third of its bandwidth).
Offsets are int64 (tensors past 2^31 elements). Forward: each value reads its s×s window of every
context, up to two contexts per launch. Backward: one pass over the gradient g, each value written
into its s×s window of every context's gradient, times 1/s². Accumulation in float32 (float64 for
float64 tensors).

Importing this module imports triton; set TRITON_INTERPRET=1 before the import to run the kernels
on the CPU (tests). The launchers that torch.library sees are in llkern/ops/context.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_BLOCK = 1024
MAX_TILES = 65535  # grid axis 1's limit on CUDA: a launch takes at most this many tiles of a row


def block_for(row_len: int) -> int:
    """Values per program: the row rounded up to a power of two, 64 to MAX_BLOCK."""
    return min(MAX_BLOCK, max(64, triton.next_power_of_2(row_len)))


@triton.jit
def _coordinates(C, H, W, tile0, BLOCK: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """(b, c, y, x) of this program's values (b and c or y scalars, the rest int32 vectors), and the mask.
    ``tile0``: the first tile of this launch (grid axis 1 holds at most 65535 tiles: longer rows take
    several launches)."""
    row = tl.program_id(0)
    j = (tile0 + tl.program_id(1)) * BLOCK + tl.arange(0, BLOCK)
    if CHANNELS_LAST:
        b = row // H
        y = row % H
        x = j // C
        c = j - x * C
        mask = j < W * C
    else:
        b = row // C
        c = row % C
        y = j // W
        x = j - y * W
        mask = j < H * W
    return b.to(tl.int64), c.to(tl.int64), y.to(tl.int64), x.to(tl.int64), mask


@triton.jit
def _window_mean(ptr, b, c, y, x, sb, sc, sy, sx, mask, S: tl.constexpr, ACC: tl.constexpr):
    """Mean of the S×S window of a context at (b, c, S·y.., S·x..)."""
    base = ptr + b * sb + c * sc + (y * S) * sy + (x * S) * sx
    total = tl.zeros(mask.shape, dtype=ACC)
    for dy in tl.static_range(S):
        for dx in tl.static_range(S):
            total += tl.load(base + dy * sy + dx * sx, mask=mask, other=0.0).to(ACC)
    return total * (1.0 / (S * S))


@triton.jit
def context_add_forward(h_ptr, c1_ptr, c2_ptr, out_ptr, C, H, W, tile0,
                        hb, hc, hy, hx, ab, ac, ay, ax, bb, bc, by, bx, ob, oc, oy, ox,
                        S1: tl.constexpr, S2: tl.constexpr, NUM_CONTEXTS: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b, c, y, x, mask = _coordinates(C, H, W, tile0, BLOCK, CHANNELS_LAST)
    acc = tl.load(h_ptr + b * hb + c * hc + y * hy + x * hx, mask=mask, other=0.0).to(ACC)
    acc += _window_mean(c1_ptr, b, c, y, x, ab, ac, ay, ax, mask, S1, ACC)
    if NUM_CONTEXTS == 2:
        acc += _window_mean(c2_ptr, b, c, y, x, bb, bc, by, bx, mask, S2, ACC)
    tl.store(out_ptr + b * ob + c * oc + y * oy + x * ox, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _spread(ptr, value, b, c, y, x, sb, sc, sy, sx, mask, S: tl.constexpr):
    """Writes value / S² to the S×S window at (b, c, S·y.., S·x..)."""
    base = ptr + b * sb + c * sc + (y * S) * sy + (x * S) * sx
    v = (value * (1.0 / (S * S))).to(ptr.dtype.element_ty)
    for dy in tl.static_range(S):
        for dx in tl.static_range(S):
            tl.store(base + dy * sy + dx * sx, v, mask=mask)


@triton.jit
def context_add_backward(g_ptr, d1_ptr, d2_ptr, C, H, W, tile0,
                         gb, gc, gy, gx, ab, ac, ay, ax, bb, bc, by, bx,
                         S1: tl.constexpr, S2: tl.constexpr, NUM_CONTEXTS: tl.constexpr,
                         CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b, c, y, x, mask = _coordinates(C, H, W, tile0, BLOCK, CHANNELS_LAST)
    g = tl.load(g_ptr + b * gb + c * gc + y * gy + x * gx, mask=mask, other=0.0).to(ACC)
    _spread(d1_ptr, g, b, c, y, x, ab, ac, ay, ax, mask, S1)
    if NUM_CONTEXTS == 2:
        _spread(d2_ptr, g, b, c, y, x, bb, bc, by, bx, mask, S2)
