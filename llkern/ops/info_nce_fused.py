"""Fused InfoNCE (Triton): the op's Python side.

``llkern::info_nce_fused`` and ``llkern::info_nce_fused_backward`` are ``torch.library.triton_op``s over
the kernels of triton_kernels/info_nce.py. The N×N similarity matrix exists only in tiles: the forward
keeps each row's (and, symmetric, each column's) log-sum-exp and the unit rows in the products' dtype;
the backward recomputes the tiles and writes d z1 and d z2 in the inputs' dtype, the normalisation's
backward included. Memory beyond the inputs and their gradients: the two operand copies (2·N·d values
of the inputs' dtype), a few values per row, and (symmetric, shared offset) the forward's partial column
sums, one row of N per program (at most twice the GPU's multiprocessors). Time: two N²d products a
direction in the backward, one in each forward pass, on the tensor cores for bfloat16.

Normalised rows bound every score, |s_ij| ≤ c = 1.01/τ (1 % for the rounding of bfloat16 unit rows), so
for τ ≥ 1.01/35 the sums take c as their offset instead of a running maximum (``shared_offset``): one
exponential per element then serves a row's sum and its column's, the symmetric forward is one pass over
the tiles, and the backward forms G with one exponential per element instead of two. (exp(−2c) ≥ e^−70
keeps every row's largest term a normal float32, so the sums are as exact as with the maximum; each loss is
log(sum / exp(s_ii − c)), a ratio near 1 where it is small.) Below that τ, without normalisation, or where the
partial column sums would need more than COLUMN_SUMS_BYTES, the kernels keep the running maximum; the
forward's choice (``_one_pass``) is passed to its backward.

:func:`llkern.functional.info_nce` takes this op for bfloat16 CUDA inputs with d ≤ 256; the blocked C++
op (``torch.ops.llkern.info_nce``) takes the rest. Call :func:`info_nce_fused` directly for float32 or
float64 (tests: exact operands, no TF32), or on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from llkern._ext import IMPLS, device_guard, no_double_backward
from llkern.ops.context import triton_available
from llkern.reference.similarity import _check_temperature, check_views

__all__ = ["fused_fits", "info_nce_fused"]

NAME = "llkern.info_nce_fused"
DTYPES = (torch.bfloat16, torch.float32, torch.float64)
MAX_WIDTH = 256  # = triton_kernels.info_nce.MAX_WIDTH (not imported here: importing it imports triton)
SCORE_BOUND = 1.01  # |u1_i · u2_j| ≤ 1 for unit rows, and ≤ (1 + 2⁻⁹)² for their bfloat16 roundings
SHARED_OFFSET_LIMIT = 35.0  # the largest offset c taken: exp(s − c) ≥ exp(−2c) ≥ e^−70, a normal float32
LOG2E = math.log2(math.e)
INTERPRETER_PROGRAMS = 3  # row_sums' programs on the CPU (few, so that the tests see programs take several blocks)
COLUMN_SUMS_BYTES = 64 * 2**20  # the most the symmetric one-pass form holds in partial column sums


def shared_offset(temperature: float, normalize: bool) -> float | None:
    """The offset c ≥ every score that the kernels' log-sum-exps take instead of a running maximum, or None
    where they keep the maximum (no normalisation: the scores are unbounded; τ < 1.01/35: the smallest
    terms would leave float32's normal range)."""
    if not normalize:
        return None
    offset = SCORE_BOUND / temperature
    return offset if offset <= SHARED_OFFSET_LIMIT else None


@contextlib.contextmanager
def running_maximum() -> Iterator[None]:
    """Within it, the fused InfoNCE and SupCon keep a running maximum at every τ (the kernels before the shared
    offset): for tests and benchmarks that compare the two. (The form is chosen at the forward and kept for its
    backward, wherever that runs.)"""
    global SHARED_OFFSET_LIMIT
    saved, SHARED_OFFSET_LIMIT = SHARED_OFFSET_LIMIT, -math.inf
    try:
        yield
    finally:
        SHARED_OFFSET_LIMIT = saved


def fused_fits(z: torch.Tensor, impl: str) -> bool:
    """Whether :func:`llkern.functional.info_nce` and ``supcon_loss`` take the fused ops for ``z`` and
    ``impl``: bfloat16 embeddings of d ≤ 256 on a CUDA GPU with bfloat16 tensor cores (compute capability 8.0 or
    more), for ``impl`` "auto" or "kernel" (any other goes on to the checks that name it)."""
    return (impl in ("auto", "kernel") and z.device.type == "cuda" and z.dtype == torch.bfloat16
            and z.shape[1] <= MAX_WIDTH and triton_available(z.device)
            and torch.cuda.get_device_capability(z.device) >= (8, 0))


def info_nce_fused(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07, *, symmetric: bool = False,
                   normalize: bool = True, impl: str = "kernel") -> torch.Tensor:
    """InfoNCE as :func:`llkern.functional.info_nce` computes it, by the fused Triton kernels.

    Args:
        z1, z2: ``(N, d)`` embeddings, d ≤ 256; bfloat16 (tensor-core products with float32 accumulation),
            float32 or float64 (exact products). Any strides with unit stride along d; others are copied.
        temperature: τ > 0.
        symmetric: average both directions (CLIP).
        normalize: L2-normalise the rows first.
        impl: ``"kernel"`` (default: raise where the kernels cannot run) or ``"reference"``.

    Returns:
        The mean loss, float32 (float64 for float64 inputs).
    """
    check_views(NAME, z1, z2)
    tau = _check_temperature(NAME, temperature)
    if impl not in IMPLS:
        raise ValueError(f"{NAME}: expected impl to be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        from llkern.reference.similarity import info_nce_reference

        return info_nce_reference(z1, z2, tau, symmetric=symmetric, normalize=normalize)
    check_fused_inputs(NAME, "z1 and z2", z1, "llkern.functional.info_nce")
    return run_info_nce_fused(z1, z2, tau, symmetric, normalize)


def check_fused_inputs(name: str, arg: str, z: torch.Tensor, other: str) -> None:
    """What the fused kernels need beyond what the losses' own checks ask."""
    if z.dtype not in DTYPES:
        raise TypeError(f"{name}: expected {arg} of dtype bfloat16, float32 or float64, got {z.dtype} "
                        f"({other} takes float16)")
    if z.shape[1] > MAX_WIDTH:
        raise ValueError(f"{name}: expected at most {MAX_WIDTH} features, got shape {list(z.shape)} "
                         f"({other} takes wider embeddings)")
    if not triton_available(z.device):
        raise RuntimeError(f"{name}: its Triton kernels run on CUDA tensors, or on CPU tensors in Triton's "
                           "interpreter (TRITON_INTERPRET=1, set before llkern's kernels are first used)")


def check_op_labels(op: str, labels: torch.Tensor, n: int, device: torch.device) -> None:
    """What the raw ops read of their labels without looking at the values (no host synchronisation): an int64
    vector of N on the data's device (a shorter one would be read past its end)."""
    if labels.dtype != torch.int64 or labels.shape != (n,) or labels.device != device:
        raise ValueError(f"{op}: expected labels as an int64 tensor of shape ({n},) on {device}, got "
                         f"{labels.dtype} of shape {tuple(labels.shape)} on {labels.device}")


def run_info_nce_fused(z1: torch.Tensor, z2: torch.Tensor, tau: float, symmetric: bool,
                       normalize: bool) -> torch.Tensor:
    """The op on inputs already checked (by :func:`info_nce_fused` or :func:`llkern.functional.info_nce`)."""
    return torch.ops.llkern.info_nce_fused(z1, z2, tau, bool(symmetric), bool(normalize))[0]


def _unit_stride(z: torch.Tensor) -> torch.Tensor:
    """z with unit stride along d, which the kernels assume (rows may have any stride)."""
    return z if z.stride(1) == 1 else z.contiguous()


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _interpreted() -> bool:
    from llkern.triton_kernels import INTERPRETED

    return INTERPRETED


def _triton_acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _params(values: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernels' scalars as a tensor of the accumulation dtype (float64 runs get float64 scalars), filled
    on the device (no copy from the host)."""
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, value in enumerate(values):
        out[i] = value
    return out


def _unit_rows(z: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from llkern.triton_kernels import info_nce as kernels

    n, d = z.shape
    u = torch.empty((n, d), dtype=z.dtype, device=z.device)
    norm = torch.empty((n if normalize else 0,), dtype=_acc(z.dtype), device=z.device)
    grid = (triton_cdiv(n, kernels.NORMALIZE_ROWS),)
    torch.library.wrap_triton(kernels.normalize_rows)[grid](
        z, u, norm, n, d, z.stride(0), NORMALIZE=normalize, ACC=_triton_acc(z.dtype), INTERPRETED=_interpreted(),
        ROWS=kernels.NORMALIZE_ROWS, BLOCK_D=kernels.width_block(d))
    return u, norm


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _programs(blocks: int, n: int, value_bytes: int, device: torch.device) -> int | None:
    """row_sums' programs for the symmetric one-pass form: one per block of rows, at most two per multiprocessor
    (they then take several blocks each) and at most what keeps their partial column sums (programs × N values)
    within COLUMN_SUMS_BYTES. None where that budget leaves fewer programs than the GPU has multiprocessors
    (N above ~127k on an H200): the two-pass form is taken there."""
    by_budget = COLUMN_SUMS_BYTES // (n * value_bytes)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = min(blocks, 2 * sms, by_budget)
        return programs if programs >= min(blocks, sms) else None
    programs = min(blocks, INTERPRETER_PROGRAMS, by_budget)
    return programs if programs >= 1 else None


def _one_pass(z: torch.Tensor, temperature: float, symmetric: bool, normalize: bool) -> bool:
    """Whether the op takes the shared offset for these inputs (the forward decides; its backward is told)."""
    if shared_offset(temperature, normalize) is None:
        return False
    if not symmetric:
        return True
    from llkern.triton_kernels import info_nce as kernels

    n, d = z.shape
    blocks = triton_cdiv(n, kernels.row_block(d))
    return _programs(blocks, n, _acc(z.dtype).itemsize, z.device) is not None


@torch.library.triton_op("llkern::info_nce_fused", mutates_args=())
def _info_nce_fused_op(z1: torch.Tensor, z2: torch.Tensor, temperature: float, symmetric: bool,
                       normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    """(loss, u1, u2, |z1|, |z2|, stats): stats[0] the rows' log-sum-exps, stats[1] the columns' (symmetric);
    where the forward takes the shared offset (``_one_pass``), their sums of exp(s − c) instead."""
    from llkern.triton_kernels import info_nce as kernels

    n, d = z1.shape
    acc = _acc(z1.dtype)
    z1, z2 = _unit_stride(z1), _unit_stride(z2)
    shared = _one_pass(z1, temperature, symmetric, normalize)
    flags = dict(ACC=_triton_acc(z1.dtype), IEEE=z1.dtype == torch.float32, INTERPRETED=_interpreted(),
                 BLOCK_M=kernels.row_block(d), BLOCK_N=kernels.COLUMN_BLOCK, BLOCK_D=kernels.width_block(d),
                 num_warps=kernels.WARPS)
    with device_guard(z1):
        u1, norm1 = _unit_rows(z1, normalize)
        u2, norm2 = _unit_rows(z2, normalize)
        if shared:
            # one pass: each exponential goes into its row's sum and its column's partial sum
            offset = SCORE_BOUND / temperature
            blocks = triton_cdiv(n, flags["BLOCK_M"])
            programs = _programs(blocks, n, acc.itemsize, z1.device) if symmetric else blocks
            sums = torch.empty((2 if symmetric else 1, n), dtype=acc, device=z1.device)
            diag = torch.empty(n, dtype=acc, device=z1.device)
            colsum = torch.zeros((programs, n) if symmetric else (0,), dtype=acc, device=z1.device)
            params = _params([LOG2E / temperature, offset * LOG2E], acc, z1.device)
            even = n % flags["BLOCK_M"] == 0 and n % flags["BLOCK_N"] == 0
            torch.library.wrap_triton(kernels.row_sums)[(programs,)](
                u1, u2, sums[0], diag, colsum, params, n, d, COLUMNS=symmetric, EVEN=even, **flags)
            if symmetric:
                sums[1].copy_(colsum.sum(0))
            # each row's (and column's) loss log(sum / exp(s_ii − c)): the log of a ratio near 1 where it is small
            loss = torch.log(sums / diag).mean()  # (symmetric: the mean of both directions' means)
            return loss, u1, u2, norm1, norm2, sums
        lse = torch.empty((2 if symmetric else 1, n), dtype=acc, device=z1.device)
        diag = torch.empty_like(lse)
        params = _params([1.0 / temperature], acc, z1.device)
        for i, (a, b) in enumerate([(u1, u2), (u2, u1)][: lse.shape[0]]):
            torch.library.wrap_triton(kernels.row_lse)[(triton_cdiv(n, flags["BLOCK_M"]),)](
                a, b, lse[i], diag[i], params, n, d, **flags)
    loss = (lse - diag).mean()  # (symmetric: the mean of both directions' means)
    return loss, u1, u2, norm1, norm2, lse


@torch.library.triton_op("llkern::info_nce_fused_backward", mutates_args=())
def _info_nce_fused_backward_op(grad: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, u1: torch.Tensor,
                                u2: torch.Tensor, norm1: torch.Tensor, norm2: torch.Tensor, stats: torch.Tensor,
                                temperature: float, symmetric: bool, normalize: bool, shared: bool, grad_z1: bool,
                                grad_z2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d z1, d z2) in the inputs' dtype, for an upstream gradient ``grad`` (0-d, on the device); one not asked
    for (grad_z1, grad_z2) is an empty tensor and costs nothing. shared: the forward took the shared offset, and
    stats holds its sums, not log-sum-exps."""
    from llkern.triton_kernels import info_nce as kernels

    n, d = z1.shape
    acc = _acc(z1.dtype)
    z1, z2 = _unit_stride(z1), _unit_stride(z2)
    weight = 1.0 / (2 * n if symmetric else n)
    scale = 1.0 / temperature
    rows_stat = stats[0]
    columns_stat = stats[1] if symmetric else stats[0]  # (unused one-way)
    grads = []
    with device_guard(z1):
        grad = grad.to(acc).reshape(())
        if shared:  # the kernels take α = w / sum, so that G_ij = exp(s_ij − c) (α_i + β_j)
            rows_stat = weight / rows_stat
            columns_stat = weight / columns_stat if symmetric else rows_stat
        # d z1: rows of s, softmax over each row (and, symmetric, over each column); d z2: rows of sᵀ, where
        # the two terms trade places.
        for wanted, a, b, z, norm, stat_a, stat_b, w_a, w_b in (
                (grad_z1, u1, u2, z1, norm1, rows_stat, columns_stat, weight, weight if symmetric else 0.0),
                (grad_z2, u2, u1, z2, norm2, columns_stat, rows_stat, weight if symmetric else 0.0, weight)):
            if not wanted:
                grads.append(z.new_empty((0,)))
                continue
            out = torch.empty((n, d), dtype=z.dtype, device=z.device)
            block = kernels.grad_row_block(d)
            values = [scale, w_a, w_b] + ([LOG2E / temperature, SCORE_BOUND / temperature * LOG2E] if shared else [])
            torch.library.wrap_triton(kernels.row_grad)[(triton_cdiv(n, block),)](
                a, b, stat_a, stat_b, z, norm, grad, _params(values, acc, z.device), out,
                n, d, z.stride(0), out.stride(0), USE_A=w_a != 0.0, USE_B=w_b != 0.0, SHARED=shared,
                NORMALIZE=normalize, ACC=_triton_acc(z.dtype), IEEE=z.dtype == torch.float32,
                INTERPRETED=_interpreted(), BLOCK_M=block, BLOCK_N=kernels.COLUMN_BLOCK,
                BLOCK_D=kernels.width_block(d), num_warps=kernels.WARPS)
            grads.append(out)
    return grads[0], grads[1]


@_info_nce_fused_op.register_fake
def _info_nce_fused_fake(z1, z2, temperature, symmetric, normalize):
    n, d = z1.shape
    acc = _acc(z1.dtype)
    return (z1.new_empty((), dtype=acc), z1.new_empty((n, d)), z2.new_empty((n, d)),
            z1.new_empty((n if normalize else 0,), dtype=acc), z2.new_empty((n if normalize else 0,), dtype=acc),
            z1.new_empty((2 if symmetric else 1, n), dtype=acc))


@_info_nce_fused_backward_op.register_fake
def _info_nce_fused_backward_fake(grad, z1, z2, u1, u2, norm1, norm2, stats, temperature, symmetric, normalize,
                                  shared, grad_z1, grad_z2):
    return z1.new_empty(z1.shape if grad_z1 else (0,)), z2.new_empty(z2.shape if grad_z2 else (0,))


def _setup_context(ctx, inputs, output):
    z1, z2, temperature, symmetric, normalize = inputs
    _, u1, u2, norm1, norm2, lse = output
    ctx.save_for_backward(z1, z2, u1, u2, norm1, norm2, lse)
    ctx.args = (temperature, symmetric, normalize, _one_pass(z1, temperature, symmetric, normalize))
    ctx.mark_non_differentiable(u1, u2, norm1, norm2, lse)


def _backward(ctx, grad, *_):
    no_double_backward("info_nce")
    if grad is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None
    wanted = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d1, d2 = torch.ops.llkern.info_nce_fused_backward(grad, *ctx.saved_tensors, *ctx.args, *wanted)
    return d1 if wanted[0] else None, d2 if wanted[1] else None, None, None, None


_info_nce_fused_op.register_autograd(_backward, setup_context=_setup_context)
