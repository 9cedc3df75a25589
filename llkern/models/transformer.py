"""A small pre-norm transformer encoder for image patches or token sequences.

:func:`transformer_encoder` builds an ``nn.Sequential`` of ``embed``, ``block_0`` … ``block_{L-1}``, ``head``: the
features between blocks are token-shaped ``(B, T, C)``, so a planner can cut it between any two blocks
(they are the :class:`TransformerBlock` children). Each block is ``y = x + a + m`` with
``a = attention(LN(x))`` and ``m = MLP(LN(x + a))``: an identity shortcut plus one residual
``r = a + m``, exposed through the residual protocol ``forward_residual(x) -> (y, r)`` that TRGL's
penalty uses.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Images ``(B, C, H, W)`` → tokens ``(B, T, dim)``: non-overlapping ``p×p`` patches, linear, + position."""

    def __init__(self, *, in_channels: int, image_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"PatchEmbed: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        # A stride-p convolution with a p×p kernel is the per-patch linear map, without an unfold copy.
        self.proj = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch_size) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"PatchEmbed: expected (B, C, {self.image_size}, {self.image_size}) images, "
                             f"got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class TokenEmbed(nn.Module):
    """Token ids ``(B, T)`` (int64, ``T <= max_len``) → ``(B, T, dim)``: embedding table + learned position."""

    def __init__(self, *, vocab_size: int, max_len: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or not 1 <= x.shape[1] <= self.pos.shape[1]:  # T = 0 would give NaN logits (mean of none)
            raise ValueError(f"TokenEmbed: expected (B, 1 <= T <= {self.pos.shape[1]}) token ids, got {tuple(x.shape)}")
        return self.embed(x) + self.pos[:, :x.shape[1]]


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``(B, T, C)`` through ``F.scaled_dot_product_attention``.

    SDPA picks a fused kernel where one exists and never materialises the attention weights in the
    fused paths; no masking (every token sees every token), which is what patch classification needs.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"SelfAttention: dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.dim = dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"SelfAttention: expected tokens of shape (B, T, {self.dim}), got {tuple(x.shape)}")
        b, t, c = x.shape
        # (B, T, 3, H, D) → three (B, H, T, D) views.
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + Attn(LN(x))``, ``y = h + MLP(LN(h))``, MLP = Linear-GELU-Linear."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attn(self.norm1(x))
        m = self.mlp(self.norm2(x + a))
        r = a + m
        # y from r (not (x + a) + m) so that y == x + r holds bit for bit, as the protocol promises.
        return x + r, r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_residual(x)[0]


class TokenClassifier(nn.Module):
    """``(B, T, C)`` → logits ``(B, classes)``: final LayerNorm (pre-norm blocks leave the stream unnormalised),
    mean over tokens, linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x).mean(dim=1))


def transformer_encoder(*, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, patch_size: int = 2,
                        vocab_size: int | None = None, max_len: int = 512, dim: int = 64, depth: int = 4,
                        num_heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0) -> nn.Sequential:
    """A pre-norm transformer encoder classifier: ``nn.Sequential`` of ``embed``, ``block_0`` … ``block_{depth-1}``,
    ``head``.

    A plain ``nn.Sequential`` (not a subclass), so that slicing it — what a planner does to cut it between
    blocks — gives ordinary ``nn.Sequential`` modules.

    Args:
        num_classes: classifier outputs.
        in_channels: image channels (patch input).
        image_size: side of the square input images (patch input).
        patch_size: side of the square patches; ``(image_size / patch_size)²`` tokens.
        vocab_size: if given, the input is token ids ``(B, T)`` embedded by a table of this size instead
            of images cut into patches; ``max_len`` then bounds ``T``.
        max_len: longest token sequence (token input only).
        dim: token width C.
        depth: number of blocks.
        num_heads: attention heads (``dim`` must be a multiple).
        mlp_ratio: hidden width of the blocks' MLP, as a multiple of ``dim``.
        dropout: dropout in attention and MLP (0 by default).

    The defaults are digits-sized: 1×8×8 images as 16 tokens of 2×2 patches, C = 64, 4 blocks of 4 heads,
    MLP 128; 136,010 parameters.
    """
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size),
                       ("patch_size", patch_size), ("max_len", max_len), ("dim", dim), ("depth", depth),
                       ("num_heads", num_heads)) + ((("vocab_size", vocab_size),) if vocab_size is not None else ()):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"transformer_encoder: expected {arg} to be an int >= 1, got {value!r}")
    if not mlp_ratio > 0 or int(dim * mlp_ratio) < 1:
        raise ValueError(f"transformer_encoder: expected mlp_ratio > 0 with a hidden width int(dim·mlp_ratio) >= 1, "
                         f"got {mlp_ratio!r}")
    embed: nn.Module
    if vocab_size is not None:
        embed = TokenEmbed(vocab_size=vocab_size, max_len=max_len, dim=dim)
    else:
        embed = PatchEmbed(in_channels=in_channels, image_size=image_size, patch_size=patch_size, dim=dim)
    units: list[tuple[str, nn.Module]] = [("embed", embed)]
    units += [(f"block_{i}", TransformerBlock(dim, num_heads, mlp_ratio, dropout)) for i in range(depth)]
    units.append(("head", TokenClassifier(dim, num_classes)))
    return nn.Sequential(OrderedDict(units))
