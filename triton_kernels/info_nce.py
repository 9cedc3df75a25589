"""Triton kernels of the fused InfoNCE: the N×N similarity matrix lives only in tiles, as attention's
scores do in FlashAttention.

With unit rows ``u1 = z1/|z1|``, ``u2 = z2/|z2|`` and ``s = u1 u2ᵀ / τ``:

- ``normalize_rows``: the products' operands (u in the operand dtype) and the clamped norms, one pass.
- ``row_lse``: for a block of rows of A, ``LSE_j (a_i · b_j) · scale`` and the diagonal ``a_i · b_i ·
  scale``, column tiles of B streamed with an online max and sum. Run on (u1, u2) for the rows of s and,
  for the symmetric loss, on (u2, u1) for its columns.
- ``row_sums``: the sums of ``exp(s_ij − c)`` against one fixed offset ``c`` that bounds every score (unit
  rows: ``|s| ≤ c ≈ 1/τ``) instead of a running maximum, so that one exponential per element serves its
  row's sum and, symmetric, its column's: rows and columns in one pass over the tiles; and the diagonal's own
  term, so that each loss is the log of a ratio (near 1 where the loss is small). Taken where ``c`` is small
  enough that every row's largest term stays a normal float (llkern/ops/info_nce_fused.py: ``shared_offset``).
- ``row_grad``: for a block of rows of A, ``d a_i = scale · grad · Σ_j G_ij b_j`` with
  ``G_ij = w_a exp(s_ij − lse_a[i]) + w_b exp(s_ij − lse_b[j]) − (w_a + w_b) δ_ij``, s recomputed tile by
  tile, then through the normalisation (``(d u − u (u·d u)) / |z|``, only ``/ |z|`` at the clamp) and
  stored in z's dtype. Run on (u1, u2) for d z1 and on (u2, u1) for d z2 (the roles of the two softmax
  terms swap). SHARED (with row_sums' offset): ``G_ij = exp(s_ij − c) (α_i + β_j)`` with ``α_i = w_a /
  sum_a[i]``, ``β_j = w_b / sum_b[j]`` from row_sums' sums: one exponential per element, not two.

Per element of s: two products of d multiply-adds in the backward, one in each forward pass, and an
exponential or two (with the shared offset: one, and the symmetric forward is one pass, not two);
nothing of s is written to memory. Products take the operand dtype (bfloat16 for
bfloat16 inputs) with float32 accumulation (float64 operands: float64); G is rounded to the operand
dtype for its product, as the backward of an eager bfloat16 matmul rounds its gradient.

Importing this module imports triton; set TRITON_INTERPRET=1 before the import to run the kernels on the
CPU (tests). The launchers that torch.library sees are in llkern/ops/info_nce_fused.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-12)  # as F.normalize (a constexpr: the compiler reads no other globals)
MAX_WIDTH = 256  # d above this would spill the row block's accumulator: the blocked C++ op takes it


def width_block(d: int) -> int:
    """The tile's width: d rounded up to a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(d))


def row_block(d: int) -> int:
    """Rows of A per program of row_lse."""
    return 128 if width_block(d) <= 128 else 64


def grad_row_block(d: int) -> int:
    """Rows of A per program of row_grad, whose float32 accumulator is rows × width_block(d): half of
    row_lse's, since at 128 rows (d = 128, 8 warps) ptxas spilled 208 bytes a thread; at 64, 202 registers
    and no spill (Triton 3.6, sm_90a)."""
    return row_block(d) // 2


COLUMN_BLOCK = 64
# 8 warps: a row block's float32 accumulator (128 × 128) is then 64 registers a thread, beside the tile of s
# (32) and the block of A; with the default 4 it would be 128 and spill. (Untuned: first GPU run pending.)
WARPS = 8
NORMALIZE_ROWS = 16


@triton.jit
def normalize_rows(z_ptr, u_ptr, norm_ptr, N, D, stride_z, NORMALIZE: tl.constexpr, ACC: tl.constexpr,
                   INTERPRETED: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """u = z / max(|z|, eps) in u's dtype (contiguous, N × D), and the clamped norms (ACC)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (dims < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    z = tl.load(z_ptr + r64 * stride_z + dims[None, :], mask=mask, other=0.0).to(ACC)
    if NORMALIZE:
        # (eps made in ACC: a bare constant would be a float32 1e-12, 4e-9 off in float64)
        norm = tl.maximum(tl.sqrt(tl.sum(z * z, 1)), tl.full((ROWS,), NORM_EPS, ACC))
        tl.store(norm_ptr + rows, norm, mask=rows < N)
        z = z / norm[:, None]
    tl.store(u_ptr + r64 * D + dims[None, :], _cast(z, u_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """x (float32 or float64) in dtype, rounded to nearest even. (Triton's interpreter truncates to bfloat16
    where a GPU rounds: there the rounding is done on the bits first, so its results are the GPU's.)"""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return tl.where(x == x, bits.to(tl.float32, bitcast=True), x).to(dtype)  # (NaN stays NaN)
    return x.to(dtype)


@triton.jit
def _dot(x, y, acc, ACC: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + x y. IEEE: float32 operands without TF32. INTERPRETED (Triton 3.6's interpreter, NumPy 2.4): its
    bfloat16 tl.dot returns garbage, so the operands are widened first (products of bfloat16 values are
    exact in float32, so only the order of the sums differs from the tensor cores'); and it cannot run a
    `for` loop to a runtime bound, so the kernels loop with `while` there and keep the `for`, which Triton
    pipelines, when compiled."""
    if INTERPRETED:
        return tl.dot(x.to(ACC), y.to(ACC), acc, input_precision="ieee", out_dtype=ACC)
    if IEEE:
        return tl.dot(x, y, acc, input_precision="ieee", out_dtype=ACC)
    return tl.dot(x, y, acc, out_dtype=ACC)


@triton.jit
def _scores(a, b_ptr, cols, dims, N, D, scale, ACC: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr):
    """One tile of s: a (rows × BLOCK_D) against the rows `cols` of B (contiguous, N × D), times scale;
    and those rows of B."""
    b_mask = (cols < N)[:, None] & (dims < D)[None, :]
    b = tl.load(b_ptr + cols.to(tl.int64)[:, None] * D + dims[None, :], mask=b_mask, other=0.0)
    s = _dot(a, tl.trans(b), None, ACC, IEEE, INTERPRETED)
    return s * scale, b


@triton.jit
def _lse_tile(a, b_ptr, start, rows, dims, N, D, scale, running_max, running_sum, diag, ACC: tl.constexpr,
              IEEE: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_N)
    s, _ = _scores(a, b_ptr, cols, dims, N, D, scale, ACC, IEEE, INTERPRETED)
    s = tl.where((cols < N)[None, :], s, float("-inf"))
    diag += tl.sum(tl.where(rows[:, None] == cols[None, :], s, 0.0), 1)
    new_max = tl.maximum(running_max, tl.max(s, 1))  # finite: every tile has a column below N
    running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), 1)
    return new_max, running_sum, diag


@triton.jit
def row_lse(a_ptr, b_ptr, lse_ptr, diag_ptr, params_ptr, N, D, ACC: tl.constexpr, IEEE: tl.constexpr,
            INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """lse[i] = LSE_j s_ij and diag[i] = s_ii for this program's rows i, s = A Bᵀ · scale (ACC); params:
    (scale, ...) in ACC, so a float64 run gets 1/τ in float64. INTERPRETED: see _dot."""
    scale = tl.load(params_ptr)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    a_mask = (rows < N)[:, None] & (dims < D)[None, :]
    a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=a_mask, other=0.0)
    running_max = tl.full((BLOCK_M,), float("-inf"), ACC)
    running_sum = tl.zeros((BLOCK_M,), ACC)
    diag = tl.zeros((BLOCK_M,), ACC)
    if INTERPRETED:
        start = 0
        while start < N:
            running_max, running_sum, diag = _lse_tile(a, b_ptr, start, rows, dims, N, D, scale, running_max,
                                                       running_sum, diag, ACC, IEEE, INTERPRETED, BLOCK_N)
            start += BLOCK_N
    else:
        for start in range(0, N, BLOCK_N):
            running_max, running_sum, diag = _lse_tile(a, b_ptr, start, rows, dims, N, D, scale, running_max,
                                                       running_sum, diag, ACC, IEEE, INTERPRETED, BLOCK_N)
    tl.store(lse_ptr + rows, running_max + tl.log(running_sum), mask=rows < N)
    tl.store(diag_ptr + rows, diag, mask=rows < N)


@triton.jit
def _sums_tile(a, b_ptr, colsum_ptr, start, row0, rows, row_ok, dims, N, D, k, offset2, row_sum, diag,
               COLUMNS: tl.constexpr, EVEN: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
               INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_N)
    t, _ = _scores(a, b_ptr, cols, dims, N, D, k, ACC, IEEE, INTERPRETED)  # s · log2(e)
    e = tl.exp2(t - offset2)  # = exp(s − c)
    if not EVEN:  # (padded rows and columns have s = 0, whose term is not 0)
        e = tl.where(row_ok[:, None] & (cols < N)[None, :], e, 0.0)
    # (only the tiles that cross the diagonal pick it out)
    if (start < row0 + BLOCK_M) & (row0 < start + BLOCK_N):
        diag += tl.sum(tl.where(rows[:, None] == cols[None, :], e, 0.0), 1)
    row_sum += tl.sum(e, 1)
    if COLUMNS:  # this program's own row of partial column sums: no other program writes it
        col_ok = cols < N
        tl.store(colsum_ptr + cols, tl.load(colsum_ptr + cols, mask=col_ok, other=0.0) + tl.sum(e, 0), mask=col_ok)
    return row_sum, diag


@triton.jit
def _block_sums(a_ptr, b_ptr, sum_ptr, diag_ptr, colsum_ptr, block, N, D, k, offset2,
                COLUMNS: tl.constexpr, EVEN: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    row0 = block * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    a_mask = row_ok[:, None] & (dims < D)[None, :]
    a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=a_mask, other=0.0)
    row_sum = tl.zeros((BLOCK_M,), ACC)
    diag = tl.zeros((BLOCK_M,), ACC)
    if INTERPRETED:
        start = 0
        while start < N:
            row_sum, diag = _sums_tile(a, b_ptr, colsum_ptr, start, row0, rows, row_ok, dims, N, D, k, offset2, row_sum,
                                       diag, COLUMNS, EVEN, ACC, IEEE, INTERPRETED, BLOCK_M, BLOCK_N)
            start += BLOCK_N
    else:
        for start in range(0, N, BLOCK_N):
            row_sum, diag = _sums_tile(a, b_ptr, colsum_ptr, start, row0, rows, row_ok, dims, N, D, k, offset2, row_sum,
                                       diag, COLUMNS, EVEN, ACC, IEEE, INTERPRETED, BLOCK_M, BLOCK_N)
    tl.store(sum_ptr + rows, row_sum, mask=row_ok)
    tl.store(diag_ptr + rows, diag, mask=row_ok)


@triton.jit
def row_sums(a_ptr, b_ptr, sum_ptr, diag_ptr, colsum_ptr, params_ptr, N, D, COLUMNS: tl.constexpr,
             EVEN: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum[i] = Σ_j exp(s_ij − c) and diag[i] = exp(s_ii − c), s = A Bᵀ · scale, for c ≥ every s_ij (the loss
    of row i is log(sum[i] / diag[i]): a ratio near 1 where the loss is small, not a difference of two numbers
    near c); COLUMNS: also the columns' sums Σ_i exp(s_ij − c), this program's share of them added into row p
    of colsum ((programs × N), zeros; the caller sums its rows). Program p takes the row blocks p, p + P, …
    (P programs), so colsum has P rows, not one per block. params: (scale·log2 e, c·log2 e) in ACC. EVEN: N a
    multiple of both blocks (no padded rows or columns)."""
    k = tl.load(params_ptr)
    offset2 = tl.load(params_ptr + 1)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    colsum_ptr += pid.to(tl.int64) * N
    num_blocks = tl.cdiv(N, BLOCK_M)
    if INTERPRETED:
        block = pid
        while block < num_blocks:
            _block_sums(a_ptr, b_ptr, sum_ptr, diag_ptr, colsum_ptr, block, N, D, k, offset2, COLUMNS, EVEN, ACC,
                        IEEE, INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_D)
            block += programs
    else:
        for block in range(pid, num_blocks, programs):
            _block_sums(a_ptr, b_ptr, sum_ptr, diag_ptr, colsum_ptr, block, N, D, k, offset2, COLUMNS, EVEN, ACC,
                        IEEE, INTERPRETED, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _grad_tile_shared(a, b_ptr, start, row0, rows, dims, N, D, k, offset2, alpha, beta_ptr, w_diag, acc,
                      USE_A: tl.constexpr, USE_B: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                      INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_N)
    t, b = _scores(a, b_ptr, cols, dims, N, D, k, ACC, IEEE, INTERPRETED)
    e = tl.exp2(t - offset2)
    # (padded columns: their rows of B are zeros, so whatever finite G they get adds nothing)
    if USE_A and USE_B:
        beta = tl.load(beta_ptr + cols, mask=cols < N, other=0.0)
        g = e * (alpha[:, None] + beta[None, :])
    elif USE_A:
        g = e * alpha[:, None]
    else:
        beta = tl.load(beta_ptr + cols, mask=cols < N, other=0.0)
        g = e * beta[None, :]
    # the diagonal's −(w_a + w_b), in the tiles that cross it and before G is rounded: G_ii = w (p_ii − 1) is
    # small where the loss is, and rounding w p_ii first would leave an error of w/256 in bfloat16
    if (start < row0 + BLOCK_M) & (row0 < start + BLOCK_N):
        g = tl.where(rows[:, None] == cols[None, :], g - w_diag, g)
    return _dot(_cast(g, b.dtype, INTERPRETED), b, acc, ACC, IEEE, INTERPRETED)


@triton.jit
def _grad_tile(a, b_ptr, start, rows, dims, N, D, scale, lse_a, lse_b_ptr, w_a, w_b, acc, USE_A: tl.constexpr,
               USE_B: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_N)
    s, b = _scores(a, b_ptr, cols, dims, N, D, scale, ACC, IEEE, INTERPRETED)
    g = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    if USE_A:
        g += w_a * tl.exp(s - lse_a[:, None])
    if USE_B:
        lse_b = tl.load(lse_b_ptr + cols, mask=cols < N, other=0.0)
        g += w_b * tl.exp(s - lse_b[None, :])
    g = tl.where(rows[:, None] == cols[None, :], g - (w_a + w_b), g)
    g = tl.where((cols < N)[None, :], g, 0.0)
    return _dot(_cast(g, b.dtype, INTERPRETED), b, acc, ACC, IEEE, INTERPRETED)


@triton.jit
def store_through_normalize(du, z_ptr, norm_ptr, out_ptr, rows, row_ok, dims, mask, stride_z, stride_out,
                            NORMALIZE: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                            BLOCK_M: tl.constexpr):
    """Store d z for these rows given d u (u = z / max(|z|, eps)), in out's dtype: (d u − u (u·d u)) / |z|, and
    only d u / eps below the clamp, as F.normalize's gradient (clamp_min passes the gradient at |z| = eps, so
    the test is on |z| itself, not on the clamped norm the forward kept). Without NORMALIZE, d u itself."""
    r64 = rows.to(tl.int64)[:, None]
    if NORMALIZE:
        z = tl.load(z_ptr + r64 * stride_z + dims[None, :], mask=mask, other=0.0).to(ACC)
        norm = tl.load(norm_ptr + rows, mask=row_ok, other=1.0)
        u = z / norm[:, None]
        radial = tl.sum(du * u, 1)
        below_clamp = tl.sqrt(tl.sum(z * z, 1)) < tl.full((BLOCK_M,), NORM_EPS, ACC)  # (eps in ACC: normalize_rows)
        du = tl.where(below_clamp[:, None], du, du - u * radial[:, None]) / norm[:, None]
    tl.store(out_ptr + r64 * stride_out + dims[None, :], _cast(du, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def row_grad(a_ptr, b_ptr, stat_a_ptr, stat_b_ptr, z_ptr, norm_ptr, grad_ptr, params_ptr, out_ptr, N, D, stride_z,
             stride_out, USE_A: tl.constexpr, USE_B: tl.constexpr, SHARED: tl.constexpr, NORMALIZE: tl.constexpr,
             ACC: tl.constexpr, IEEE: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """d z (of A's rows) = grad · scale · Σ_j G_ij b_j through the normalisation, in out's dtype; params:
    (scale, w_a, w_b, scale·log2 e, c·log2 e) in ACC; grad: the loss's gradient, read on the device. stat_a,
    stat_b: the log-sum-exps lse_a (of A's rows) and lse_b (of B's), or, SHARED, α = w_a / sum_a and
    β = w_b / sum_b with row_sums' sums of exp(s − c)."""
    scale = tl.load(params_ptr)
    w_a = tl.load(params_ptr + 1)
    w_b = tl.load(params_ptr + 2)
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    a_mask = row_ok[:, None] & (dims < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    a = tl.load(a_ptr + r64 * D + dims[None, :], mask=a_mask, other=0.0)
    stat_a = tl.load(stat_a_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    if SHARED:
        k = tl.load(params_ptr + 3)
        offset2 = tl.load(params_ptr + 4)
        if INTERPRETED:
            start = 0
            while start < N:
                acc = _grad_tile_shared(a, b_ptr, start, row0, rows, dims, N, D, k, offset2, stat_a, stat_b_ptr,
                                        w_a + w_b, acc, USE_A, USE_B, ACC, IEEE, INTERPRETED, BLOCK_M, BLOCK_N)
                start += BLOCK_N
        else:
            for start in range(0, N, BLOCK_N):
                acc = _grad_tile_shared(a, b_ptr, start, row0, rows, dims, N, D, k, offset2, stat_a, stat_b_ptr,
                                        w_a + w_b, acc, USE_A, USE_B, ACC, IEEE, INTERPRETED, BLOCK_M, BLOCK_N)
    else:
        if INTERPRETED:
            start = 0
            while start < N:
                acc = _grad_tile(a, b_ptr, start, rows, dims, N, D, scale, stat_a, stat_b_ptr, w_a, w_b, acc, USE_A,
                                 USE_B, ACC, IEEE, INTERPRETED, BLOCK_M, BLOCK_N)
                start += BLOCK_N
        else:
            for start in range(0, N, BLOCK_N):
                acc = _grad_tile(a, b_ptr, start, rows, dims, N, D, scale, stat_a, stat_b_ptr, w_a, w_b, acc, USE_A,
                                 USE_B, ACC, IEEE, INTERPRETED, BLOCK_M, BLOCK_N)
    grad = tl.load(grad_ptr).to(ACC)
    store_through_normalize(acc * (scale * grad), z_ptr, norm_ptr, out_ptr, rows, row_ok, dims, a_mask, stride_z,
                            stride_out, NORMALIZE, ACC, INTERPRETED, BLOCK_M)
