"""Triton kernels of the fused Rényi-2 mutual information (MOLE's local objective): the N×N Gaussian Gram
matrix lives only in tiles, as the similarity matrix does in triton_kernels/info_nce.py, whose helpers these
share.

With u = (t − mean) / σ (rows in units of the kernel width, centred so that |u_i|² + |u_j|² − 2 u_i·u_j does
not cancel a common offset), ``K²_ij = exp(−|u_i − u_j|²)`` (K_ij = exp(−|t_i − t_j|² / 2σ²)) and
``same_ij = [y_i = y_j]``:

- ``row_sums``: for a block of rows, ``Σ_j K²_ij``, ``Σ_j K²_ij same_ij`` and ``Σ_j same_ij``, column tiles
  streamed. The mutual information is formed from their totals (llkern/ops/renyi_fused.py).
- ``row_grad``: with ``H_ij = K²_ij (a + b same_ij)`` (a, b: the loss's coefficients, the upstream gradient
  and 1/σ included), ``d t_i = Σ_j H_ij (u_i − u_j) = (Σ_j H_ij) u_i − Σ_j H_ij u_j``: one product for the
  distances and one for H u a tile. H is rounded to u's dtype for its product and its row sum is taken of the
  rounded values, so that the two terms cancel as the exact ones would (with float32 sums of the unrounded H
  the difference of two terms of size |u| would carry H's rounding, 2⁻⁹ |u| for bfloat16).

The Gram matrix's diagonal is set to exactly 1 (K_ii = 1) and every distance clamped at 0 (rounding can make
|u_i|² + |u_j|² − 2 u_i·u_j slightly negative). Per element: one product of d multiply-adds in the forward,
two in the backward, one exponential each way; nothing of the Gram matrix is written to memory.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .info_nce import _cast, _dot, _scores

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _gram_tile(a, u_ptr, sq_ptr, sq_rows, start, row0, rows, dims, N, D, SELF: tl.constexpr, ACC: tl.constexpr,
               IEEE: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """K² of this tile (ACC; on the diagonal exactly 1, or 0 without SELF), its columns, their rows of u, and
    whether each column is below N."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dots, b = _scores(a, u_ptr, cols, dims, N, D, 1.0, ACC, IEEE, INTERPRETED)
    sq_cols = tl.load(sq_ptr + cols, mask=col_ok, other=0.0)
    distance = sq_rows[:, None] + sq_cols[None, :] - 2.0 * dots
    # (clamped at 0 by a select, not tl.maximum: that compiles to PTX max, which turns a NaN distance into 0,
    # K² into 1 and the value of a NaN input into a finite 0)
    distance = tl.where(distance < 0.0, 0.0, distance)
    k2 = tl.exp2(distance * -LOG2E)
    if (start < row0 + BLOCK_M) & (row0 < start + BLOCK_N):  # only tiles that cross the diagonal hold j = i
        k2 = tl.where(rows[:, None] == cols[None, :], 1.0 if SELF else 0.0, k2)
    return k2, cols, col_ok, b


@triton.jit
def _sums_tile(a, u_ptr, sq_ptr, labels_ptr, sq_rows, label_rows, start, row0, rows, dims, N, D, all_sum, same_sum,
               same_count, ACC: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    k2, cols, col_ok, _ = _gram_tile(a, u_ptr, sq_ptr, sq_rows, start, row0, rows, dims, N, D, True, ACC, IEEE,
                                     INTERPRETED, BLOCK_M, BLOCK_N)
    k2 = tl.where(col_ok[None, :], k2, 0.0)
    label_cols = tl.load(labels_ptr + cols, mask=col_ok, other=0)
    same = (label_rows[:, None] == label_cols[None, :]) & col_ok[None, :]
    all_sum += tl.sum(k2, 1)
    same_sum += tl.sum(tl.where(same, k2, 0.0), 1)
    same_count += tl.sum(same.to(tl.int32), 1)
    return all_sum, same_sum, same_count


@triton.jit
def row_sums(u_ptr, sq_ptr, labels_ptr, all_ptr, same_ptr, count_ptr, N, D, ACC: tl.constexpr, IEEE: tl.constexpr,
             INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """For this program's rows i: Σ_j K²_ij, Σ_j K²_ij [y_i = y_j] (ACC) and the count of j with y_j = y_i,
    i included (int32). sq: |u_i|² in ACC."""
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    a = tl.load(u_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_ok[:, None] & (dims < D)[None, :],
                other=0.0)
    sq_rows = tl.load(sq_ptr + rows, mask=row_ok, other=0.0)
    label_rows = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    all_sum = tl.zeros((BLOCK_M,), ACC)
    same_sum = tl.zeros((BLOCK_M,), ACC)
    same_count = tl.zeros((BLOCK_M,), tl.int32)
    if INTERPRETED:  # (see info_nce._dot)
        start = 0
        while start < N:
            all_sum, same_sum, same_count = _sums_tile(a, u_ptr, sq_ptr, labels_ptr, sq_rows, label_rows, start, row0,
                                                       rows, dims, N, D, all_sum, same_sum, same_count, ACC, IEEE,
                                                       INTERPRETED, BLOCK_M, BLOCK_N)
            start += BLOCK_N
    else:
        for start in range(0, N, BLOCK_N):
            all_sum, same_sum, same_count = _sums_tile(a, u_ptr, sq_ptr, labels_ptr, sq_rows, label_rows, start, row0,
                                                       rows, dims, N, D, all_sum, same_sum, same_count, ACC, IEEE,
                                                       INTERPRETED, BLOCK_M, BLOCK_N)
    tl.store(all_ptr + rows, all_sum, mask=row_ok)
    tl.store(same_ptr + rows, same_sum, mask=row_ok)
    tl.store(count_ptr + rows, same_count, mask=row_ok)


@triton.jit
def _grad_tile(a, u_ptr, sq_ptr, labels_ptr, sq_rows, label_rows, start, row0, rows, dims, N, D, coef_all,
               coef_same, acc, h_sum, ACC: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # (the diagonal's u_i − u_i is 0: K²_ii left out, so that its term does not have to cancel in h_sum u_i − acc)
    k2, cols, col_ok, b = _gram_tile(a, u_ptr, sq_ptr, sq_rows, start, row0, rows, dims, N, D, False, ACC, IEEE,
                                     INTERPRETED, BLOCK_M, BLOCK_N)
    label_cols = tl.load(labels_ptr + cols, mask=col_ok, other=0)
    h = k2 * tl.where(label_rows[:, None] == label_cols[None, :], coef_same, coef_all)
    h = _cast(tl.where(col_ok[None, :], h, 0.0), b.dtype, INTERPRETED)
    h_sum += tl.sum(h.to(ACC), 1)
    return _dot(h, b, acc, ACC, IEEE, INTERPRETED), h_sum


@triton.jit
def row_grad(u_ptr, sq_ptr, labels_ptr, coef_ptr, out_ptr, N, D, stride_out, ACC: tl.constexpr, IEEE: tl.constexpr,
             INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """d t (this program's rows) = Σ_j H_ij (u_i − u_j), H_ij = K²_ij (a + b [y_i = y_j]), in out's dtype;
    coef: (a, a + b) in ACC, on the device (they hold the upstream gradient)."""
    coef_all = tl.load(coef_ptr)
    coef_same = tl.load(coef_ptr + 1)
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (dims < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    a = tl.load(u_ptr + r64 * D + dims[None, :], mask=mask, other=0.0)
    sq_rows = tl.load(sq_ptr + rows, mask=row_ok, other=0.0)
    label_rows = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    h_sum = tl.zeros((BLOCK_M,), ACC)
    if INTERPRETED:
        start = 0
        while start < N:
            acc, h_sum = _grad_tile(a, u_ptr, sq_ptr, labels_ptr, sq_rows, label_rows, start, row0, rows, dims, N, D,
                                    coef_all, coef_same, acc, h_sum, ACC, IEEE, INTERPRETED, BLOCK_M, BLOCK_N)
            start += BLOCK_N
    else:
        for start in range(0, N, BLOCK_N):
            acc, h_sum = _grad_tile(a, u_ptr, sq_ptr, labels_ptr, sq_rows, label_rows, start, row0, rows, dims, N, D,
                                    coef_all, coef_same, acc, h_sum, ACC, IEEE, INTERPRETED, BLOCK_M, BLOCK_N)
    # (u_i reloaded here rather than widened before the loop, which kept a register copy alive through it)
    u_rows = tl.load(u_ptr + r64 * D + dims[None, :], mask=mask, other=0.0).to(ACC)
    d = h_sum[:, None] * u_rows - acc
    tl.store(out_ptr + r64 * stride_out + dims[None, :], _cast(d, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)
