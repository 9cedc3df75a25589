"""Triton kernels of the context-supply add (ContSup): ``out = h + Σ_i avgpool_{s_i}(c_i)``.

Forward: one program per BLOCK elements of ``out``, taken in out's memory order (NCHW or
channels_last, so loads and stores of h and out are coalesced); each element reads its s×s window
of every context, up to two contexts per launch. Backward: one pass over the gradient g, each
element written into its s×s window of every context's gradient, times 1/s². Index arithmetic is
int64 (tensors past 2^31 elements). Accumulation in float32 (float64 for float64 tensors).

Importing this module imports triton; set TRITON_INTERPRET=1 before the import to run the kernels
on the CPU (tests). The launchers that torch.library sees are in llkern/ops/context.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _coordinates(idx, C, H, W, CHANNELS_LAST: tl.constexpr):
    """(b, c, y, x) of linear index ``idx`` in NCHW or channels_last (NHWC) memory order."""
    if CHANNELS_LAST:
        c = idx % C
        rest = idx // C
        x = rest % W
        rest = rest // W
        y = rest % H
        b = rest // H
    else:
        x = idx % W
        rest = idx // W
        y = rest % H
        rest = rest // H
        c = rest % C
        b = rest // C
    return b, c, y, x


@triton.jit
def _window_mean(ptr, b, c, y, x, sb, sc, sy, sx, mask, S: tl.constexpr, ACC: tl.constexpr):
    """Mean of the S×S window of a context at (b, c, S·y.., S·x..)."""
    base = ptr + b * sb + c * sc + (y * S) * sy + (x * S) * sx
    total = tl.zeros(b.shape, dtype=ACC)
    for dy in tl.static_range(S):
        for dx in tl.static_range(S):
            total += tl.load(base + dy * sy + dx * sx, mask=mask, other=0.0).to(ACC)
    return total * (1.0 / (S * S))


@triton.jit
def context_add_forward(h_ptr, c1_ptr, c2_ptr, out_ptr, numel, C, H, W,
                        hb, hc, hy, hx, ab, ac, ay, ax, bb, bc, by, bx, ob, oc, oy, ox,
                        S1: tl.constexpr, S2: tl.constexpr, NUM_CONTEXTS: tl.constexpr,
                        CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    b, c, y, x = _coordinates(idx, C, H, W, CHANNELS_LAST)
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
def context_add_backward(g_ptr, d1_ptr, d2_ptr, numel, C, H, W,
                         gb, gc, gy, gx, ab, ac, ay, ax, bb, bc, by, bx,
                         S1: tl.constexpr, S2: tl.constexpr, NUM_CONTEXTS: tl.constexpr,
                         CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    b, c, y, x = _coordinates(idx, C, H, W, CHANNELS_LAST)
    g = tl.load(g_ptr + b * gb + c * gc + y * gy + x * gx, mask=mask, other=0.0).to(ACC)
    _spread(d1_ptr, g, b, c, y, x, ab, ac, ay, ax, mask, S1)
    if NUM_CONTEXTS == 2:
        _spread(d2_ptr, g, b, c, y, x, bb, bc, by, bx, mask, S2)
