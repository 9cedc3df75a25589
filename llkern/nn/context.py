"""Context supply (ContSup, Yu et al., arXiv 2312.07636) for :class:`llkern.LocalNet`.

Local modules see only the previous module's output, and what an earlier module discarded is lost
to all later ones. ContSup adds context back to module k's (detached) input boundary ``h_k``:

* mode ``"E"``: an image encoder, two conv3×3 + BN + ReLU from the network's input, at the input's
  resolution, pooled to h_k's shape;
* mode ``"R"``: the previous boundary ``h_{k−1}`` (module k−1's input) through conv1×1 + BN + ReLU,
  pooled to h_k's shape;
* mode ``"RE"``: both.

The pooling is fused into the add (:func:`llkern.ops.context.context_add`, a Triton kernel). The
boundary tensors stay detached; the encoders of module k are trained by module k's local loss and
are part of the inference graph (:meth:`ContextSupply.cost` reports their parameters and FLOPs).
Module 0 gets no context (its input is the image itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llkern.ops.context import context_add

MODES = ("E", "R", "RE")


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def _scale(name: str, big: torch.Size, small: torch.Size) -> int:
    if min(small[-2:]) < 1:
        raise ValueError(f"ContextSupply: expected a boundary with a non-empty spatial size, got {list(small[-2:])}")
    s = big[-2] // small[-2]
    if s < 1 or big[-2] != s * small[-2] or big[-1] != s * small[-1]:
        raise ValueError(f"ContextSupply: the {name} ({list(big[-2:])}) is not an integer multiple of the boundary's "
                         f"spatial size ({list(small[-2:])})")
    return s


@dataclass
class ContextCost:
    """Parameters and multiply-add FLOPs (per sample, 2 per multiply-add, convolutions only) of the
    context encoders, per module and in total."""

    parameters: list[int]
    flops: list[int]

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters)

    @property
    def total_flops(self) -> int:
        return sum(self.flops)


class ContextSupply(nn.Module):
    """The context encoders of a K-module network.

    Args:
        mode: ``"E"``, ``"R"`` or ``"RE"`` (see the module docstring).
        input_shapes: the shape of each module's input for one sample batch, ``(B, C, H, W)``;
            ``input_shapes[0]`` is the network's input (the image).
        impl: implementation of the fused add (``"auto"``, ``"kernel"``, ``"reference"``).
    """

    def __init__(self, mode: str, input_shapes: list[torch.Size], impl: str = "auto") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"ContextSupply: expected mode to be one of {MODES}, got {mode!r}")
        if len(input_shapes) == 0:
            raise ValueError("ContextSupply: expected input_shapes to hold one shape per module, got none")
        if any(len(s) != 4 for s in input_shapes):
            raise ValueError("ContextSupply: context supply needs image-like module inputs (B, C, H, W), got "
                             f"{[list(s) for s in input_shapes]}")
        self.mode, self.impl = mode, impl
        self.input_shapes = [torch.Size(s) for s in input_shapes]
        image = self.input_shapes[0]
        self.image_encoders = nn.ModuleList()
        self.previous_encoders = nn.ModuleList()
        self.image_scales: list[int] = []
        self.previous_scales: list[int] = []
        for k in range(1, len(self.input_shapes)):
            here, previous = self.input_shapes[k], self.input_shapes[k - 1]
            channels = here[1]
            if "E" in mode:
                self.image_scales.append(_scale("input image", image, here))
                self.image_encoders.append(nn.Sequential(*_conv_bn_relu(image[1], channels, 3),
                                                         *_conv_bn_relu(channels, channels, 3)))
            if "R" in mode:
                self.previous_scales.append(_scale(f"boundary before module {k - 1}", previous, here))
                self.previous_encoders.append(nn.Sequential(*_conv_bn_relu(previous[1], channels, 1)))

    def forward(self, k: int, boundary: torch.Tensor, image: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Module k's input (k ≥ 1): ``boundary + pool(E(image)) [+ pool(R(previous))]``.

        ``image`` is the network's input and ``previous`` module k−1's input boundary; both are
        detached here, so the contexts' gradients stop at the encoders."""
        if k < 1:
            raise ValueError(f"ContextSupply: module 0 has no context, got k={k}")
        if k >= len(self.input_shapes):
            raise IndexError(f"ContextSupply: expected k in 1..{len(self.input_shapes) - 1} (the modules with a "
                             f"context), got k={k}")
        contexts = []
        if "E" in self.mode:
            contexts.append(self.image_encoders[k - 1](image.detach()))
        if "R" in self.mode:
            contexts.append(self.previous_encoders[k - 1](previous.detach()))
        if torch.is_autocast_enabled(boundary.device.type):
            # under autocast the encoders' convolutions give the autocast dtype while the boundary may be
            # float32 (a module ending on an op autocast runs in float32): add in the boundary's dtype
            contexts = [c.to(boundary.dtype) for c in contexts]
        return context_add(boundary, *contexts, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, modules={len(self.input_shapes)}, image_scales={self.image_scales}, "
                f"previous_scales={self.previous_scales}, impl={self.impl!r}")

    def cost(self) -> ContextCost:
        """Parameters and FLOPs per sample of each module's encoders (index k−1 for module k)."""
        parameters, flops = [], []
        for k in range(1, len(self.input_shapes)):
            encoders = []
            if "E" in self.mode:
                encoders.append((self.image_encoders[k - 1], self.input_shapes[0]))
            if "R" in self.mode:
                encoders.append((self.previous_encoders[k - 1], self.input_shapes[k - 1]))
            count = work = 0
            for encoder, shape in encoders:
                count += sum(p.numel() for p in encoder.parameters())
                for layer in encoder:
                    if isinstance(layer, nn.Conv2d):  # stride 1, same padding: output at the input's size
                        kh, kw = layer.kernel_size
                        work += 2 * layer.in_channels * layer.out_channels * kh * kw * shape[-2] * shape[-1]
            parameters.append(count)
            flops.append(work)
        return ContextCost(parameters, flops)
