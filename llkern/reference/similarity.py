"""Plain-PyTorch references of the similarity-matrix losses (issue 4): InfoNCE, supervised
contrastive, and the matrix-based Rényi mutual information of order 2 (with a general-α path
through an eigen-decomposition for small batches).

These hold the whole N×N matrix: they define the losses (the tiled kernels are tested against
them in float64) and are the fallback where no kernel is built. Formulas: docs/similarity.md.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from llkern._ext import check_values

__all__ = [
    "check_embeddings",
    "check_views",
    "default_sigma",
    "default_sigma_tensor",
    "gram_gaussian",
    "info_nce_reference",
    "label_gram",
    "renyi_entropy_reference",
    "renyi_mutual_information_reference",
    "supcon_reference",
]


def check_embeddings(name: str, arg: str, z: object) -> None:
    """Clear errors for an (N, d) floating-point, finite, non-empty embedding matrix."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name}: expected {arg} to be a Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{name}: expected {arg} to be a floating-point tensor, got {z.dtype}")
    if z.dim() != 2:
        raise ValueError(f"{name}: expected {arg} of shape (N, d), got {list(z.shape)}")
    if z.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got {arg} of shape {list(z.shape)}")
    if z.shape[1] == 0:
        raise ValueError(f"{name}: expected {arg} to have d >= 1 features, got shape {list(z.shape)}")
    # (a host sync on a GPU: there only with llkern.value_checks() on; without it the loss is NaN)
    if check_values(z) and not bool(torch.isfinite(z).all()):
        raise ValueError(f"{name}: {arg} contains NaN or infinite values")


def check_views(name: str, z1: object, z2: object) -> None:
    """Clear errors for two views that are not embeddings of one shape, dtype and device."""
    check_embeddings(name, "z1", z1)
    check_embeddings(name, "z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"{name}: expected z1 and z2 of the same shape, got {list(z1.shape)} and {list(z2.shape)}")
    if z1.device != z2.device or z1.dtype != z2.dtype:
        raise ValueError(f"{name}: expected z1 and z2 on one device with one dtype, got {z1.device}/{z1.dtype} "
                         f"and {z2.device}/{z2.dtype}")


def _check_temperature(name: str, temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not float(temperature) > 0.0 \
            or not math.isfinite(float(temperature)):
        raise ValueError(f"{name}: expected temperature to be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_labels(name: str, labels: object, n: int, device: torch.device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected labels to be a Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name}: expected integer labels, got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"{name}: expected labels of shape ({n},), got {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name}: expected labels on the device of the embeddings ({device}), got {labels.device}")


def info_nce_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07, *, symmetric: bool = False,
                       normalize: bool = True) -> torch.Tensor:
    """InfoNCE with the positives on the diagonal: ``mean_i [LSE_j s_ij - s_ii]``, ``s = z1 z2ᵀ / τ``.

    With ``symmetric`` the mean of both directions (rows and columns of s, as CLIP). ``normalize``
    L2-normalises the rows first; pass False when they already are. N = 1 gives 0 (the one
    candidate is the positive).
    """
    name = "llkern.info_nce"
    check_views(name, z1, z2)
    tau = _check_temperature(name, temperature)
    acc = torch.float64 if z1.dtype == torch.float64 else torch.float32
    a, b = z1.to(acc), z2.to(acc)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    s = a @ b.T / tau
    diagonal = s.diagonal()
    rows = (torch.logsumexp(s, dim=1) - diagonal).mean()
    if not symmetric:
        return rows
    columns = (torch.logsumexp(s, dim=0) - diagonal).mean()
    return 0.5 * (rows + columns)


def supcon_reference(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07, *,
                     normalize: bool = True) -> torch.Tensor:
    """Supervised contrastive loss on one view, self excluded (Khosla et al.'s L_out).

    ``L_i = -(1/|P(i)|) Σ_{p∈P(i)} [s_ip - LSE_{a≠i} s_ia]`` with ``P(i) = {p ≠ i : y_p = y_i}``,
    averaged over the anchors that have at least one positive. Anchors without a positive
    partner contribute nothing; if no anchor has one (N = 1 included) the loss is 0 with zero
    gradients. Duplicated rows are ordinary rows.
    """
    name = "llkern.supcon"
    check_embeddings(name, "z", z)
    _check_labels(name, labels, z.shape[0], z.device)
    tau = _check_temperature(name, temperature)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    a = F.normalize(z.to(acc), dim=1) if normalize else z.to(acc)
    n = a.shape[0]
    s = a @ a.T / tau
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    lse = torch.logsumexp(s.masked_fill(self_mask, float("-inf")), dim=1) if n > 1 else s.new_zeros(1)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(dim=1)
    has_positive = count > 0
    # mean over positives of (s_ip - lse_i), per anchor; anchors without positives masked out
    per_anchor = (torch.where(positive, s, 0.0).sum(dim=1) - count * lse) / count.clamp_min(1)
    anchors = has_positive.sum()
    return -(torch.where(has_positive, per_anchor, 0.0).sum() / anchors.clamp_min(1))


def default_sigma(t: torch.Tensor) -> float:
    """Kernel width for the Gaussian Gram matrix: Silverman's rule in d dimensions,
    ``σ = s · (4 / (d + 2))^{1/(d+4)} · N^{-1/(d+4)}``, s the root of the mean per-feature variance
    (computed without gradient; 1 when the batch has no spread)."""
    return float(default_sigma_tensor(t))


def default_sigma_tensor(t: torch.Tensor) -> torch.Tensor:
    """:func:`default_sigma` as a float64 0-d tensor on ``t``'s device: no host synchronisation, and it
    works on meta and fake tensors."""
    n, d = t.shape
    factor = (4.0 / (d + 2)) ** (1.0 / (d + 4)) * n ** (-1.0 / (d + 4))
    if n < 2:
        return torch.full((), factor, dtype=torch.float64, device=t.device)
    spread = t.detach().double().var(dim=0, unbiased=False).mean().sqrt()
    spread = torch.where((spread > 0) & torch.isfinite(spread), spread, torch.ones_like(spread))
    return spread * factor


def gram_gaussian(t: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """``K_ij = exp(-‖t_i - t_j‖² / (2σ²))``, the distances formed exactly (no cancellation)."""
    diff = t[:, None, :] - t[None, :, :]
    return torch.exp(-(diff * diff).sum(-1) / (2.0 * sigma * sigma))


def label_gram(labels: torch.Tensor, sigma: float | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The labels' Gram matrix: the Gaussian kernel of one-hot codes (squared distance 2 between
    different labels), ``exp(-1/σ²)`` off the label blocks; ``sigma=None`` is the limit σ → 0, the
    label-equality indicator."""
    same = (labels[:, None] == labels[None, :]).to(dtype)
    if sigma is None:
        return same
    return same + (1.0 - same) * math.exp(-1.0 / (sigma * sigma))


def renyi_entropy_reference(gram: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Matrix-based Rényi entropy in bits of a Gram matrix: ``A = K / tr(K)``,
    ``S_α(A) = log2(Σ λ_i(A)^α) / (1 - α)``; α = 2 through ``-log2 ‖A‖_F²`` (no eigenvalues)."""
    a = gram / gram.diagonal().sum()
    if alpha == 2.0:
        return -torch.log2((a * a).sum())
    if alpha <= 0 or alpha == 1.0:
        raise ValueError(f"llkern.renyi_entropy: expected alpha > 0 and != 1, got {alpha}")
    eigenvalues = torch.linalg.eigvalsh(a).clamp_min(0.0)
    return torch.log2((eigenvalues**alpha).sum()) / (1.0 - alpha)


def renyi_mutual_information_reference(t: torch.Tensor, labels: torch.Tensor, *, sigma: float | None = None,
                                       label_sigma: float | None = None, alpha: float = 2.0) -> torch.Tensor:
    """``I(T; Y) = S(A) + S(B) - S(A, B)`` in bits, with A the Gaussian Gram matrix of the rows of
    ``t`` (width ``sigma``, default :func:`default_sigma`), B the labels' Gram matrix and
    ``S(A, B) = S(A∘B / tr(A∘B))``. Rows are flattened: ``t`` may be (N, ...)."""
    name = "llkern.renyi_mutual_information"
    if isinstance(t, torch.Tensor) and t.dim() > 2:
        t = t.flatten(1)
    check_embeddings(name, "t", t)
    _check_labels(name, labels, t.shape[0], t.device)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if sigma is None:
        width = default_sigma_tensor(t)  # float64, as the float it once was: 2σ² rounds once, to t's dtype
    elif isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) and sigma > 0 and math.isfinite(sigma):
        width = float(sigma)
    else:
        raise ValueError(f"{name}: expected sigma to be a finite number > 0, got {sigma!r}")
    a = gram_gaussian(t.to(acc), width)
    b = label_gram(labels, label_sigma, dtype=acc)
    return (renyi_entropy_reference(a, alpha) + renyi_entropy_reference(b, alpha)
            - renyi_entropy_reference(a * b, alpha))
