"""Similarity-matrix losses (InfoNCE, supervised contrastive, Rényi-2 mutual information): the
ops' Python side.

``torch.ops.llkern.info_nce``, ``supcon_loss`` and ``renyi_mutual_information`` are declared in
csrc/ops.cpp and implemented in csrc/bindings/similarity_cpu.cpp over csrc/cpu/similarity.cpp.
They go over the N×N matrix one block of rows at a time and never hold it: the forward keeps
per-row (and per-column) log-sum-exp statistics, and with ``with_grad`` it also forms the
gradients (these losses are leaves of a local graph), so the backward only scales them. Called
without ``with_grad`` while inputs need gradients, the backward recomputes the blocks.
Definitions: docs/similarity.md; references: llkern/reference/similarity.py.
"""

from __future__ import annotations

import math
import numbers

import torch

from llkern._ext import extension_loaded, no_double_backward, use_kernel
from llkern.ops.info_nce_fused import fused_fits, run_info_nce_fused
from llkern.ops.renyi_fused import run_renyi_fused
from llkern.ops.supcon_fused import run_supcon_fused
from llkern.reference.similarity import (
    _check_labels,
    _check_temperature,
    check_embeddings,
    check_views,
    info_nce_reference,
    renyi_mutual_information_reference,
    supcon_reference,
)

__all__ = ["info_nce", "renyi_mutual_information", "supcon_loss"]


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07, *, symmetric: bool = False,
             normalize: bool = True, impl: str = "auto") -> torch.Tensor:
    """InfoNCE of two views with the positives on the diagonal, computed block by block.

    ``s_ij = z1_i · z2_j / τ`` and ``L = mean_i [LSE_j s_ij − s_ii]``; with ``symmetric`` the mean of
    that and the same over the columns (CLIP). The N×N matrix is never held: bfloat16 CUDA embeddings
    (d ≤ 256) take the fused Triton op (:mod:`llkern.ops.info_nce_fused`: only tiles of it, in
    registers), the rest the blocked C++ op (blocks of rows of it).

    Args:
        z1, z2: ``(N, d)`` embeddings of the two views (float32, float64, bfloat16, float16).
        temperature: τ > 0 (stable down to 0.01 with unit vectors).
        symmetric: average both directions.
        normalize: L2-normalise the rows first; pass False when they already are unit vectors.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"`` (see :mod:`llkern._ext`).

    Returns:
        The mean loss, float32 (float64 for float64 inputs). N = 1 gives 0.
    """
    name = "llkern.info_nce"
    check_views(name, z1, z2)
    tau = _check_temperature(name, temperature)
    if fused_fits(z1, impl):  # bfloat16 on a GPU: the fused Triton kernels, no N×N blocks
        return run_info_nce_fused(z1, z2, tau, symmetric, normalize)
    if use_kernel("info_nce", z1.device, impl):
        return torch.ops.llkern.info_nce(z1, z2, tau, bool(symmetric), bool(normalize),
                                         _needs_grad(z1, z2))[0]
    return info_nce_reference(z1, z2, tau, symmetric=symmetric, normalize=normalize)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07, *, normalize: bool = True,
                impl: str = "auto") -> torch.Tensor:
    """Supervised contrastive loss on one view (Khosla et al.'s L_out, self excluded), block by block (bfloat16
    CUDA embeddings with d ≤ 256: by the fused Triton op, :mod:`llkern.ops.supcon_fused`, tile by tile).

    ``L_i = −(1/|P(i)|) Σ_{p∈P(i)} [s_ip − LSE_{a≠i} s_ia]`` with ``P(i) = {p ≠ i : y_p = y_i}``,
    averaged over the anchors that have a positive. Anchors without one contribute nothing; a batch
    where none has one (N = 1 included) gives 0 with zero gradients.

    Args:
        z: ``(N, d)`` embeddings.
        labels: ``(N,)`` integer labels (any values; only equality matters).
        temperature: τ > 0 (InfoPro used 0.07).
        normalize: L2-normalise the rows first.
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.
    """
    name = "llkern.supcon"
    check_embeddings(name, "z", z)
    _check_labels(name, labels, z.shape[0], z.device)
    tau = _check_temperature(name, temperature)
    if fused_fits(z, impl):  # bfloat16 on a GPU: the fused Triton kernels
        return run_supcon_fused(z, labels, tau, normalize)
    if use_kernel("supcon_loss", z.device, impl):
        return torch.ops.llkern.supcon_loss(z, labels.to(torch.int64), tau, bool(normalize), _needs_grad(z))[0]
    return supcon_reference(z, labels, tau, normalize=normalize)


def _check_width(name: str, arg: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0.0 \
            or not math.isfinite(float(value)):
        raise ValueError(f"{name}: expected {arg} to be a finite number > 0 or None, got {value!r}")
    return float(value)


def check_renyi_inputs(name: str, t: torch.Tensor, labels: torch.Tensor, sigma: object,
                       label_sigma: object) -> tuple[torch.Tensor, float | None, float | None]:
    """Rényi MI's argument checks (shared with :func:`llkern.ops.renyi_fused.renyi_fused`): t with its rows
    flattened, and the two widths as floats or None."""
    if isinstance(t, torch.Tensor) and t.dim() > 2:
        t = t.flatten(1)
    check_embeddings(name, "t", t)
    _check_labels(name, labels, t.shape[0], t.device)
    return t, _check_width(name, "sigma", sigma), _check_width(name, "label_sigma", label_sigma)


def renyi_mutual_information(t: torch.Tensor, labels: torch.Tensor, *, sigma: float | None = None,
                             label_sigma: float | None = None, alpha: float = 2.0,
                             impl: str = "auto") -> torch.Tensor:
    """Matrix-based Rényi mutual information ``I(T; Y) = S(A) + S(B) − S(A, B)`` in bits (MOLE).

    A is the Gaussian Gram matrix of the rows of ``t`` (flattened), B the labels' Gram matrix
    and ``S(A, B) = S(A∘B / tr(A∘B))``. For α = 2 the entropies are Frobenius norms, accumulated
    block by block with the gradient (bfloat16 CUDA inputs with d ≤ 256: by the fused Triton op,
    :mod:`llkern.ops.renyi_fused`, tile by tile); other α go through an eigen-decomposition (reference
    path, small N only).

    Args:
        t: ``(N, ...)`` representations (rows flattened).
        labels: ``(N,)`` integer labels.
        sigma: kernel width; None uses Silverman's rule on the batch (docs/similarity.md).
        label_sigma: width of the labels' kernel on one-hot codes; None is the label-equality indicator.
        alpha: Rényi order (2 runs the kernel).
        impl: ``"auto"``, ``"kernel"`` or ``"reference"``.

    Returns:
        I(T; Y) in bits, float32 (float64 for float64 inputs); maximise it as a local objective.
    """
    t, sigma, label_sigma = check_renyi_inputs("llkern.renyi_mutual_information", t, labels, sigma, label_sigma)
    if alpha == 2.0 and fused_fits(t, impl):  # bfloat16 on a GPU: the fused Triton kernels, no N×N blocks
        return run_renyi_fused(t, labels, sigma, label_sigma)
    if alpha == 2.0 and use_kernel("renyi_mutual_information", t.device, impl):
        return torch.ops.llkern.renyi_mutual_information(t, labels.to(torch.int64), sigma, label_sigma,
                                                         _needs_grad(t))[0]
    return renyi_mutual_information_reference(t, labels, sigma=sigma, label_sigma=label_sigma, alpha=alpha)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_or_empty(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=_acc(x.dtype)) if with_grad else x.new_empty((0,), dtype=_acc(x.dtype))


if extension_loaded() and hasattr(torch.ops.llkern, "info_nce"):

    @torch.library.register_fake("llkern::info_nce")
    def _fake_info_nce(z1, z2, temperature, symmetric, normalize, with_grad=False):
        return (z1.new_empty((), dtype=_acc(z1.dtype)), _grad_or_empty(z1, with_grad),
                _grad_or_empty(z2, with_grad))

    @torch.library.register_fake("llkern::supcon_loss")
    def _fake_supcon(z, labels, temperature, normalize, with_grad=False):
        return z.new_empty((), dtype=_acc(z.dtype)), _grad_or_empty(z, with_grad)

    @torch.library.register_fake("llkern::renyi_mutual_information")
    def _fake_renyi(t, labels, sigma, label_sigma, with_grad=False):
        return t.new_empty((), dtype=_acc(t.dtype)), _grad_or_empty(t, with_grad)

    # Autograd: the forward with with_grad already formed d loss / d inputs; the backward scales
    # them by the incoming gradient (or, without them, calls the op again with with_grad=True).
    def _scaled(grad: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (d * grad.to(d.dtype)).to(dtype)

    def _setup_info_nce(ctx, inputs, output):
        z1, z2, temperature, symmetric, normalize, with_grad = inputs
        ctx.args = (temperature, symmetric, normalize)
        ctx.with_grad = with_grad
        ctx.dtype = z1.dtype
        ctx.save_for_backward(*(output[1:] if with_grad else (z1, z2)))

    def _backward_info_nce(ctx, grad, *_):
        no_double_backward("info_nce")
        if ctx.with_grad:
            d1, d2 = ctx.saved_tensors
        else:
            _, d1, d2 = torch.ops.llkern.info_nce(*ctx.saved_tensors, *ctx.args, True)
        return _scaled(grad, d1, ctx.dtype), _scaled(grad, d2, ctx.dtype), None, None, None, None

    def _register_one_input(name: str, op) -> None:
        """Autograd of an op ``(x, *args, with_grad) -> (loss, d loss / d x)`` (supcon, Rényi MI)."""

        def setup(ctx, inputs, output):
            x, *args, with_grad = inputs
            ctx.args, ctx.with_grad, ctx.dtype = args, with_grad, x.dtype
            ctx.save_for_backward(output[1] if with_grad else x)

        def backward(ctx, grad, *_):
            no_double_backward(name.removeprefix("llkern::"))
            (saved,) = ctx.saved_tensors
            d = saved if ctx.with_grad else op(saved, *ctx.args, True)[1]
            return _scaled(grad, d, ctx.dtype), *([None] * (len(ctx.args) + 1))

        torch.library.register_autograd(name, backward, setup_context=setup)

    torch.library.register_autograd("llkern::info_nce", _backward_info_nce, setup_context=_setup_info_nce)
    _register_one_input("llkern::supcon_loss", torch.ops.llkern.supcon_loss)
    _register_one_input("llkern::renyi_mutual_information", torch.ops.llkern.renyi_mutual_information)
