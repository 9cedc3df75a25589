"""Pure-PyTorch reference of the fused auxiliary head: pool → linear → cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_rows(features: torch.Tensor) -> torch.Tensor:
    """Rows the head classifies: ``(B,C,H,W)`` → mean over H, W → ``(B,C)``; ``(B,C)`` as is;
    ``(B,T,C)`` → ``(B·T, C)`` (one row per token, no pooling)."""
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 3:
        return features.reshape(-1, features.shape[-1])
    return features


def aux_head_loss_reference(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (float32, or float64 for float64 inputs) and the number of correct predictions (int64).

    Cross-entropy as ``F.cross_entropy``, except that a batch whose targets are all
    ``ignore_index`` gives 0 (with zero gradients) instead of NaN.
    """
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    rows = pool_rows(features).to(acc)
    logits = F.linear(rows, weight.to(acc), None if bias is None else bias.to(acc))
    flat_target = target.reshape(-1).long()  # F.cross_entropy takes int64 only
    valid = flat_target != ignore_index
    losses = F.cross_entropy(logits, flat_target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                             reduction="none")
    total = losses.sum()
    loss = total / valid.sum().clamp_min(1) if reduction == "mean" else total
    correct = ((logits.detach().argmax(dim=1) == flat_target) & valid).sum()
    return loss, correct
