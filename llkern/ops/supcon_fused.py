"""Fused supervised contrastive loss (Triton): the op's Python side.

``llkern::supcon_fused`` and ``llkern::supcon_fused_backward`` are ``torch.library.triton_op``s over
triton_kernels/supcon.py, built like the fused InfoNCE (llkern/ops/info_nce_fused.py): the N×N matrix only in
tiles; the forward keeps each row's log-sum-exp over the other rows, its count of positives and the unit rows
in the products' dtype; the backward recomputes the tiles. Memory beyond the input and its gradient: N·d
values of the input's dtype and a few per row. Time: one N²d product in the forward, two in the backward;
where the fused InfoNCE takes a fixed offset (normalised rows, τ ≥ 1.01/35: ``shared_offset``), the backward
forms G_kj + G_jk with one exponential per element instead of two.

:func:`llkern.functional.supcon_loss` takes this op for bfloat16 CUDA inputs with d ≤ 256; the blocked C++
op the rest. Call :func:`supcon_fused` directly for float32 or float64, or on CPU tensors under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from llkern._ext import IMPLS, device_guard, no_double_backward
from llkern.ops.info_nce_fused import (
    LOG2E,
    _acc,
    _interpreted,
    _params,
    _triton_acc,
    _unit_rows,
    _unit_stride,
    check_fused_inputs,
    check_op_labels,
    shared_offset,
    triton_cdiv,
)
from llkern.reference.similarity import _check_labels, _check_temperature, check_embeddings

__all__ = ["supcon_fused"]

NAME = "llkern.supcon_fused"


def supcon_fused(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07, *, normalize: bool = True,
                 impl: str = "kernel") -> torch.Tensor:
    """The supervised contrastive loss as :func:`llkern.functional.supcon_loss` computes it, by the fused
    Triton kernels.

    Args:
        z: ``(N, d)`` embeddings, d ≤ 256; bfloat16 (tensor-core products, float32 accumulation), float32 or
            float64 (exact products). Unit stride along d (others are copied).
        labels: ``(N,)`` integer labels; only equality matters.
        temperature: τ > 0.
        normalize: L2-normalise the rows first.
        impl: ``"kernel"`` (default: raise where the kernels cannot run) or ``"reference"``.

    Returns:
        The mean loss over the anchors with a positive, float32 (float64 for float64 inputs); 0 when no anchor
        has one.
    """
    check_embeddings(NAME, "z", z)
    _check_labels(NAME, labels, z.shape[0], z.device)
    tau = _check_temperature(NAME, temperature)
    if impl not in IMPLS:
        raise ValueError(f"{NAME}: expected impl to be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        from llkern.reference.similarity import supcon_reference

        return supcon_reference(z, labels, tau, normalize=normalize)
    check_fused_inputs(NAME, "z", z, "llkern.functional.supcon_loss")
    return run_supcon_fused(z, labels, tau, normalize)


def run_supcon_fused(z: torch.Tensor, labels: torch.Tensor, tau: float, normalize: bool) -> torch.Tensor:
    """The op on inputs already checked (by :func:`supcon_fused` or :func:`llkern.functional.supcon_loss`)."""
    return torch.ops.llkern.supcon_fused(z, labels.to(torch.int64).contiguous(), tau, bool(normalize))[0]


def _blocks(d: int) -> dict:
    from llkern.triton_kernels import info_nce

    return dict(BLOCK_N=info_nce.COLUMN_BLOCK, BLOCK_D=info_nce.width_block(d), num_warps=info_nce.WARPS)


@torch.library.triton_op("llkern::supcon_fused", mutates_args=())
def _supcon_fused_op(z: torch.Tensor, labels: torch.Tensor, temperature: float,
                     normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, u, |z|, lse over the other rows, count of positives (int32))."""
    from llkern.triton_kernels import info_nce, supcon

    n, d = z.shape
    check_op_labels("llkern::supcon_fused", labels, n, z.device)
    acc = _acc(z.dtype)
    z, labels = _unit_stride(z), labels.contiguous()
    with device_guard(z):
        u, norm = _unit_rows(z, normalize)
        lse = torch.empty(n, dtype=acc, device=z.device)
        positive_sum = torch.empty_like(lse)
        count = torch.empty(n, dtype=torch.int32, device=z.device)
        block = info_nce.row_block(d)
        torch.library.wrap_triton(supcon.row_stats)[(triton_cdiv(n, block),)](
            u, labels, lse, positive_sum, count, _params([1.0 / temperature], acc, z.device), n, d,
            ACC=_triton_acc(z.dtype), IEEE=z.dtype == torch.float32, INTERPRETED=_interpreted(), BLOCK_M=block,
            **_blocks(d))
    anchor = count > 0
    per_anchor = (positive_sum - count * lse) / count.clamp_min(1)
    loss = -(torch.where(anchor, per_anchor, 0.0).sum() / anchor.sum().clamp_min(1))
    return loss, u, norm, lse, count


@torch.library.triton_op("llkern::supcon_fused_backward", mutates_args=())
def _supcon_fused_backward_op(grad: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, u: torch.Tensor,
                              norm: torch.Tensor, lse: torch.Tensor, count: torch.Tensor, temperature: float,
                              normalize: bool) -> torch.Tensor:
    """d z in z's dtype for an upstream gradient ``grad`` (0-d, on the device)."""
    from llkern.triton_kernels import info_nce, supcon

    n, d = z.shape
    check_op_labels("llkern::supcon_fused_backward", labels, n, z.device)
    acc = _acc(z.dtype)
    z, labels = _unit_stride(z), labels.contiguous()
    anchor = count > 0
    # d loss / d s_ij = -grad / A · ([j ∈ P(i)] / c_i − softmax_i(j)) for anchors i: w_i = 1 / A (the kernel
    # multiplies grad in last)
    w = torch.where(anchor, 1.0 / anchor.sum().clamp_min(1).to(acc), 0.0).to(acc)
    inv_count = 1.0 / count.clamp_min(1).to(acc)
    out = torch.empty((n, d), dtype=z.dtype, device=z.device)
    block = info_nce.grad_row_block(d)
    scale = 1.0 / temperature
    offset = shared_offset(temperature, normalize)
    if offset is not None:  # one exponential per element: G_kj + G_jk = exp(s_kj − c) (α_k + α_j) − …
        stat, values = w * torch.exp(offset - lse), [scale, scale * LOG2E, offset * LOG2E]
    else:
        stat, values = lse, [scale]
    with device_guard(z):
        torch.library.wrap_triton(supcon.row_grad)[(triton_cdiv(n, block),)](
            u, labels, stat, w, inv_count, z, norm, grad.to(acc).reshape(()), _params(values, acc, z.device), out, n, d,
            z.stride(0), out.stride(0), SHARED=offset is not None, NORMALIZE=normalize, ACC=_triton_acc(z.dtype),
            IEEE=z.dtype == torch.float32, INTERPRETED=_interpreted(), BLOCK_M=block, **_blocks(d))
    return out


@_supcon_fused_op.register_fake
def _supcon_fused_fake(z, labels, temperature, normalize):
    n, d = z.shape
    acc = _acc(z.dtype)
    return (z.new_empty((), dtype=acc), z.new_empty((n, d)), z.new_empty((n if normalize else 0,), dtype=acc),
            z.new_empty((n,), dtype=acc), z.new_empty((n,), dtype=torch.int32))


@_supcon_fused_backward_op.register_fake
def _supcon_fused_backward_fake(grad, z, labels, u, norm, lse, count, temperature, normalize):
    return z.new_empty(z.shape)


def _setup_context(ctx, inputs, output):
    z, labels, temperature, normalize = inputs
    _, u, norm, lse, count = output
    ctx.save_for_backward(z, labels, u, norm, lse, count)
    ctx.args = (temperature, normalize)
    ctx.mark_non_differentiable(u, norm, lse, count)


def _backward(ctx, grad, *_):
    no_double_backward("supcon_loss")
    if grad is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    return torch.ops.llkern.supcon_fused_backward(grad, *ctx.saved_tensors, *ctx.args), None, None, None


_supcon_fused_op.register_autograd(_backward, setup_context=_setup_context)
