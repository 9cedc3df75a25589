"""Triton kernels of the fused supervised contrastive loss (Khosla et al.'s L_out, self excluded): the N×N
similarity matrix lives only in tiles, as in triton_kernels/info_nce.py, whose helpers these share.

With unit rows u (info_nce.normalize_rows) and ``s = u uᵀ / τ``, ``P(i) = {p ≠ i : y_p = y_i}``, c_i = |P(i)|:

- ``row_stats``: for a block of rows, ``LSE_{a≠i} s_ia``, ``Σ_{p∈P(i)} s_ip`` and c_i, column tiles streamed
  with an online max and sum (labels compared per tile: no host-side grouping). The loss
  ``−(1/A) Σ_{c_i>0} (Σ_p s_ip − c_i LSE_i) / c_i`` over the A anchors with a positive is formed from these.
- ``row_grad``: with ``G_ij = w_i (exp(s_ij − LSE_i) − [j∈P(i)] / c_i)`` (j ≠ i; ``w_i = 1 / A`` for anchors,
  0 otherwise), ``d u_k = (grad/τ) Σ_j (G_kj + G_jk) u_j`` (s is symmetric, so one tile gives both terms), then
  the normalisation's backward, stored in z's dtype.

  SHARED (normalised rows, τ not too small: llkern/ops/info_nce_fused.py, ``shared_offset``): with an offset
  c ≥ every score and ``α_i = w_i exp(c − LSE_i)``, ``G_kj + G_jk = exp(s_kj − c) (α_k + α_j) − [j∈P(k)]
  (w_k / c_k + w_j / c_j)``: one exponential per element instead of two.

Per element of s: one product of d multiply-adds in the forward, two in the backward, and three
exponentials (SHARED: two); nothing of s is written to memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .info_nce import _cast, _dot, _scores, store_through_normalize


@triton.jit
def _stats_tile(a, b_ptr, labels_ptr, label_rows, start, rows, dims, N, D, scale, running_max, running_sum,
                positive_sum, count, ACC: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr,
                BLOCK_N: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_N)
    s, _ = _scores(a, b_ptr, cols, dims, N, D, scale, ACC, IEEE, INTERPRETED)
    others = (cols < N)[None, :] & (rows[:, None] != cols[None, :])
    label_cols = tl.load(labels_ptr + cols, mask=cols < N, other=0)
    positive = others & (label_rows[:, None] == label_cols[None, :])
    positive_sum += tl.sum(tl.where(positive, s, 0.0), 1)
    count += tl.sum(positive.to(tl.int32), 1)
    s = tl.where(others, s, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(s, 1))
    # (-inf until a row has met another column: only N = 1 never does)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(s - shift[:, None]), 1)
    return new_max, running_sum, positive_sum, count


@triton.jit
def row_stats(u_ptr, labels_ptr, lse_ptr, positive_sum_ptr, count_ptr, params_ptr, N, D, ACC: tl.constexpr,
              IEEE: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """For this program's rows i: LSE over a ≠ i of s_ia (0 when there is no other row), the sum of s_ip
    over the positives, and their count (int32). params: (scale,) in ACC."""
    scale = tl.load(params_ptr)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    a = tl.load(u_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims < D)[None, :],
                other=0.0)
    label_rows = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    running_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    running_sum = tl.zeros((BLOCK_M,), ACC)
    positive_sum = tl.zeros((BLOCK_M,), ACC)
    count = tl.zeros((BLOCK_M,), tl.int32)
    if INTERPRETED:  # (see info_nce._dot)
        start = 0
        while start < N:
            running_max, running_sum, positive_sum, count = _stats_tile(
                a, u_ptr, labels_ptr, label_rows, start, rows, dims, N, D, scale, running_max, running_sum,
                positive_sum, count, ACC, IEEE, INTERPRETED, BLOCK_N)
            start += BLOCK_N
    else:
        for start in range(0, N, BLOCK_N):
            running_max, running_sum, positive_sum, count = _stats_tile(
                a, u_ptr, labels_ptr, label_rows, start, rows, dims, N, D, scale, running_max, running_sum,
                positive_sum, count, ACC, IEEE, INTERPRETED, BLOCK_N)
    # 0 for a row that met no other column (N = 1 only); a NaN or inf score stays NaN, as in the reference
    alone = running_max == float("-inf")
    lse = tl.where(alone, 0.0, running_max + tl.log(tl.where(alone, 1.0, running_sum)))
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(positive_sum_ptr + rows, positive_sum, mask=row_ok)
    tl.store(count_ptr + rows, count, mask=row_ok)


@triton.jit
def _grad_tile(a, u_ptr, labels_ptr, label_rows, start, rows, dims, N, D, scale, lse_rows, w_rows, inv_count_rows,
               lse_ptr, w_ptr, inv_count_ptr, acc, ACC: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr,
               BLOCK_N: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    s, b = _scores(a, u_ptr, cols, dims, N, D, scale, ACC, IEEE, INTERPRETED)
    others = col_ok[None, :] & (rows[:, None] != cols[None, :])
    label_cols = tl.load(labels_ptr + cols, mask=col_ok, other=0)
    positive = others & (label_rows[:, None] == label_cols[None, :])
    lse_cols = tl.load(lse_ptr + cols, mask=col_ok, other=0.0)
    w_cols = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    inv_count_cols = tl.load(inv_count_ptr + cols, mask=col_ok, other=0.0)
    # G_kj + G_jk. Self and tail columns at -inf first: then every exponential is a softmax entry (at most 1;
    # s_kk itself can exceed its row's LSE over the others by far), and they vanish.
    s = tl.where(others, s, float("-inf"))
    g = w_rows[:, None] * (tl.exp(s - lse_rows[:, None]) - tl.where(positive, inv_count_rows[:, None], 0.0))
    g += w_cols[None, :] * (tl.exp(s - lse_cols[None, :]) - tl.where(positive, inv_count_cols[None, :], 0.0))
    return _dot(_cast(g, b.dtype, INTERPRETED), b, acc, ACC, IEEE, INTERPRETED)


@triton.jit
def _grad_tile_shared(a, u_ptr, labels_ptr, label_rows, start, row0, rows, dims, N, D, k, offset2, alpha_rows,
                      positive_rows, alpha_ptr, w_ptr, inv_count_ptr, acc, ACC: tl.constexpr, IEEE: tl.constexpr,
                      INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    t, b = _scores(a, u_ptr, cols, dims, N, D, k, ACC, IEEE, INTERPRETED)
    label_cols = tl.load(labels_ptr + cols, mask=col_ok, other=0)
    alpha_cols = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0)
    positive_cols = tl.load(w_ptr + cols, mask=col_ok, other=0.0) * tl.load(inv_count_ptr + cols, mask=col_ok,
                                                                            other=0.0)
    # (padded columns: their rows of u are zeros, so the finite G they get adds nothing)
    g = tl.exp2(t - offset2) * (alpha_rows[:, None] + alpha_cols[None, :])
    g -= tl.where(label_rows[:, None] == label_cols[None, :], positive_rows[:, None] + positive_cols[None, :], 0.0)
    if (start < row0 + BLOCK_M) & (row0 < start + BLOCK_N):  # only tiles that cross the diagonal hold j = k
        g = tl.where(rows[:, None] == cols[None, :], 0.0, g)
    return _dot(_cast(g, b.dtype, INTERPRETED), b, acc, ACC, IEEE, INTERPRETED)


@triton.jit
def row_grad(u_ptr, labels_ptr, stat_ptr, w_ptr, inv_count_ptr, z_ptr, norm_ptr, grad_ptr, params_ptr, out_ptr, N, D,
             stride_z, stride_out, SHARED: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr,
             IEEE: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """d z (this program's rows) = grad · scale · Σ_j (G_kj + G_jk) u_j through the normalisation, in out's
    dtype. w: 1 / anchors for anchors, 0 otherwise (ACC); inv_count: 1 / max(c, 1) (ACC); stat: LSE over the
    other rows, or, SHARED, α = w exp(c − LSE) (≤ e⁷⁰ / anchors: the upstream gradient is kept out of it and
    multiplied in at the end); grad: the loss's gradient, read on the device; params: (scale,), SHARED (scale,
    scale·log2 e, c·log2 e)."""
    scale = tl.load(params_ptr)
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    a_mask = row_ok[:, None] & (dims < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    a = tl.load(u_ptr + r64 * D + dims[None, :], mask=a_mask, other=0.0)
    label_rows = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    stat_rows = tl.load(stat_ptr + rows, mask=row_ok, other=0.0)
    w_rows = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    inv_count_rows = tl.load(inv_count_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    if SHARED:
        k = tl.load(params_ptr + 1)
        offset2 = tl.load(params_ptr + 2)
        positive_rows = w_rows * inv_count_rows
        if INTERPRETED:
            start = 0
            while start < N:
                acc = _grad_tile_shared(a, u_ptr, labels_ptr, label_rows, start, row0, rows, dims, N, D, k, offset2,
                                        stat_rows, positive_rows, stat_ptr, w_ptr, inv_count_ptr, acc, ACC, IEEE,
                                        INTERPRETED, BLOCK_M, BLOCK_N)
                start += BLOCK_N
        else:
            for start in range(0, N, BLOCK_N):
                acc = _grad_tile_shared(a, u_ptr, labels_ptr, label_rows, start, row0, rows, dims, N, D, k, offset2,
                                        stat_rows, positive_rows, stat_ptr, w_ptr, inv_count_ptr, acc, ACC, IEEE,
                                        INTERPRETED, BLOCK_M, BLOCK_N)
    elif INTERPRETED:  # (see info_nce._dot)
        start = 0
        while start < N:
            acc = _grad_tile(a, u_ptr, labels_ptr, label_rows, start, rows, dims, N, D, scale, stat_rows, w_rows,
                             inv_count_rows, stat_ptr, w_ptr, inv_count_ptr, acc, ACC, IEEE, INTERPRETED, BLOCK_N)
            start += BLOCK_N
    else:
        for start in range(0, N, BLOCK_N):
            acc = _grad_tile(a, u_ptr, labels_ptr, label_rows, start, rows, dims, N, D, scale, stat_rows, w_rows,
                             inv_count_rows, stat_ptr, w_ptr, inv_count_ptr, acc, ACC, IEEE, INTERPRETED, BLOCK_N)
    grad = tl.load(grad_ptr).to(ACC)
    store_through_normalize(acc * (scale * grad), z_ptr, norm_ptr, out_ptr, rows, row_ok, dims, a_mask, stride_z,
                            stride_out, NORMALIZE, ACC, INTERPRETED, BLOCK_M)
