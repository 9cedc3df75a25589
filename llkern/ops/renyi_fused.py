"""Fused Rényi-2 mutual information (Triton): the op's Python side.

``llkern::renyi_fused`` and ``llkern::renyi_fused_backward`` are ``torch.library.triton_op``s over
triton_kernels/renyi.py, built like the fused InfoNCE (llkern/ops/info_nce_fused.py): the N×N Gaussian Gram
matrix only in tiles. The forward centres the rows and divides them by the kernel width σ (u, in the input's
dtype: the products' operands), streams the tiles for each row's sums of K² and of K² over its own label, and
keeps u, |u|² and the two totals; the backward recomputes the tiles. Memory beyond the input and its
gradient: N·d values of the input's dtype and a few per row (while u is formed, two float32 copies of a
16-bit input, and with Silverman's width a float64 one for the variance). Time: one N²d product in the
forward, two in the backward, on the tensor cores for bfloat16.

Precision: u is rounded to the input's dtype after centring, so in bfloat16 a distance |u_i − u_j| carries
an error of about 2⁻⁹ |u|: small where rows lie within a few kernel widths of their mean (Silverman's width
puts them there), large where they spread over many widths with a small given σ (rows 150 widths apart:
gradient ~15 % off, where the blocked op's float32 products are 1e-5 off). Pass float32 for such data.

With ``F_all = Σ K²``, ``F_same = Σ K² [y_i = y_j]``, the labels' ``F_labels = Σ B²`` and
``F_joint = F_same + b² (F_all − F_same)`` (``b² = exp(−2/label_sigma²)`` off the label blocks, 0 without
label_sigma): ``I = log2 F_joint − log2 F_all − log2 F_labels + 2 log2 N`` (every trace is N), and
``dI/dt_i = Σ_j K²_ij (a + c [y_i = y_j]) (u_i − u_j)`` with ``a = −4/ln 2 (b²/F_joint − 1/F_all)/σ``,
``c = −4/ln 2 (1 − b²)/F_joint/σ``, as the blocked C++ op (csrc/bindings/similarity_common.h) forms them.

:func:`llkern.functional.renyi_mutual_information` takes this op for bfloat16 CUDA inputs with d ≤ 256 (α = 2);
the blocked op the rest. Call :func:`renyi_fused` directly for float32 or float64, or on CPU tensors under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch

from llkern._ext import IMPLS, device_guard, no_double_backward
from llkern.ops.info_nce_fused import (
    _acc,
    _interpreted,
    _triton_acc,
    _unit_stride,
    check_fused_inputs,
    check_op_labels,
    triton_cdiv,
)
from llkern.reference.similarity import default_sigma_tensor

__all__ = ["renyi_fused"]

NAME = "llkern.renyi_fused"


def renyi_fused(t: torch.Tensor, labels: torch.Tensor, *, sigma: float | None = None,
                label_sigma: float | None = None, impl: str = "kernel") -> torch.Tensor:
    """Rényi-2 mutual information ``I(T; Y)`` in bits as :func:`llkern.functional.renyi_mutual_information`
    computes it (α = 2), by the fused Triton kernels.

    Args:
        t: ``(N, ...)`` representations, rows flattened to d ≤ 256 features; bfloat16 (tensor-core products,
            float32 accumulation), float32 or float64 (exact products).
        labels: ``(N,)`` integer labels; only equality matters.
        sigma: the Gaussian kernel's width; None: Silverman's rule on the batch (docs/similarity.md).
        label_sigma: width of the labels' kernel on one-hot codes; None: the label-equality indicator.
        impl: ``"kernel"`` (default: raise where the kernels cannot run) or ``"reference"``.

    Returns:
        I(T; Y) in bits, float32 (float64 for float64 inputs).
    """
    from llkern.ops.similarity import check_renyi_inputs

    t, sigma, label_sigma = check_renyi_inputs(NAME, t, labels, sigma, label_sigma)
    if impl not in IMPLS:
        raise ValueError(f"{NAME}: expected impl to be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        from llkern.reference.similarity import renyi_mutual_information_reference

        return renyi_mutual_information_reference(t, labels, sigma=sigma, label_sigma=label_sigma)
    check_fused_inputs(NAME, "t", t, "llkern.functional.renyi_mutual_information")
    return run_renyi_fused(t, labels, sigma, label_sigma)


def run_renyi_fused(t: torch.Tensor, labels: torch.Tensor, sigma: float | None,
                    label_sigma: float | None) -> torch.Tensor:
    """The op on inputs already checked (2-D t; by :func:`renyi_fused` or the functional)."""
    return torch.ops.llkern.renyi_fused(t, labels.to(torch.int64).contiguous(), sigma, label_sigma)[0]


def _blocks(d: int) -> dict:
    from llkern.triton_kernels import info_nce

    return dict(BLOCK_N=info_nce.COLUMN_BLOCK, BLOCK_D=info_nce.width_block(d), num_warps=info_nce.WARPS)


def _off_label_square(label_sigma: float | None) -> float:
    """B_ij² off the label blocks: exp(−2/label_sigma²) (one-hot codes are √2 apart), 0 for the indicator."""
    return 0.0 if label_sigma is None else math.exp(-2.0 / (label_sigma * label_sigma))


@torch.library.triton_op("llkern::renyi_fused", mutates_args=())
def _renyi_fused_op(t: torch.Tensor, labels: torch.Tensor, sigma: float | None,
                    label_sigma: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """(I in bits, u = (t − mean)/σ in t's dtype, |u|² (ACC), (F_all, F_joint) (float64), σ (float64, 0-d))."""
    from llkern.triton_kernels import info_nce, renyi

    n, d = t.shape
    check_op_labels("llkern::renyi_fused", labels, n, t.device)
    acc = _acc(t.dtype)
    t, labels = _unit_stride(t), labels.contiguous()
    with device_guard(t):
        t_acc = t.to(acc)
        width = (torch.full((), sigma, dtype=torch.float64, device=t.device) if sigma is not None
                 else default_sigma_tensor(t_acc))
        u = (t_acc - t_acc.mean(0, keepdim=True)).div_(width.to(acc)).to(t.dtype)  # (one float32 copy, not two)
        del t_acc
        sq = torch.linalg.vector_norm(u, dim=1, dtype=acc).square_()  # of the rounded rows: the products see those
        all_sum = torch.empty(n, dtype=acc, device=t.device)
        same_sum = torch.empty_like(all_sum)
        count = torch.empty(n, dtype=torch.int32, device=t.device)
        block = info_nce.row_block(d)
        torch.library.wrap_triton(renyi.row_sums)[(triton_cdiv(n, block),)](
            u, sq, labels, all_sum, same_sum, count, n, d, ACC=_triton_acc(t.dtype), IEEE=t.dtype == torch.float32,
            INTERPRETED=_interpreted(), BLOCK_M=block, **_blocks(d))
    off_sq = _off_label_square(label_sigma)
    f_all = all_sum.double().sum()
    f_same = same_sum.double().sum()
    same_pairs = count.double().sum()  # Σ over labels of their count²
    f_labels = same_pairs + off_sq * (n * n - same_pairs)
    f_joint = f_same + off_sq * (f_all - f_same)
    mi = torch.log2(f_joint) - torch.log2(f_all) - torch.log2(f_labels / (n * n))  # (no constant of N: compiles once)
    return mi.to(acc), u, sq, torch.stack([f_all, f_joint]), width


@torch.library.triton_op("llkern::renyi_fused_backward", mutates_args=())
def _renyi_fused_backward_op(grad: torch.Tensor, labels: torch.Tensor, u: torch.Tensor, sq: torch.Tensor,
                             totals: torch.Tensor, width: torch.Tensor, label_sigma: float | None) -> torch.Tensor:
    """d t in u's dtype for an upstream gradient ``grad`` (0-d, on the device)."""
    from llkern.triton_kernels import info_nce, renyi

    n, d = u.shape
    check_op_labels("llkern::renyi_fused_backward", labels, n, u.device)
    acc = _acc(u.dtype)
    labels = labels.contiguous()
    off_sq = _off_label_square(label_sigma)
    f_all, f_joint = totals[0], totals[1]
    scale = grad.double().reshape(()) * (-4.0 / math.log(2.0)) / width
    coef_all = scale * (off_sq / f_joint - 1.0 / f_all)
    coef = torch.stack([coef_all, coef_all + scale * (1.0 - off_sq) / f_joint]).to(acc)  # (a, a + c), float64
    out = torch.empty((n, d), dtype=u.dtype, device=u.device)
    block = info_nce.grad_row_block(d)
    with device_guard(u):
        torch.library.wrap_triton(renyi.row_grad)[(triton_cdiv(n, block),)](
            u, sq, labels, coef, out, n, d, out.stride(0), ACC=_triton_acc(u.dtype), IEEE=u.dtype == torch.float32,
            INTERPRETED=_interpreted(), BLOCK_M=block, **_blocks(d))
    return out


@_renyi_fused_op.register_fake
def _renyi_fused_fake(t, labels, sigma, label_sigma):
    n, d = t.shape
    acc = _acc(t.dtype)
    return (t.new_empty((), dtype=acc), t.new_empty((n, d)), t.new_empty((n,), dtype=acc),
            t.new_empty((2,), dtype=torch.float64), t.new_empty((), dtype=torch.float64))


@_renyi_fused_backward_op.register_fake
def _renyi_fused_backward_fake(grad, labels, u, sq, totals, width, label_sigma):
    return u.new_empty(u.shape)


def _setup_context(ctx, inputs, output):
    _, labels, _, label_sigma = inputs
    _, u, sq, totals, width = output
    ctx.save_for_backward(labels, u, sq, totals, width)
    ctx.label_sigma = label_sigma
    ctx.mark_non_differentiable(u, sq, totals, width)


def _backward(ctx, grad, *_):
    no_double_backward("renyi_mutual_information")
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    return torch.ops.llkern.renyi_fused_backward(grad, *ctx.saved_tensors, ctx.label_sigma), None, None, None


_renyi_fused_op.register_autograd(_backward, setup_context=_setup_context)
