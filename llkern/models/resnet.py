"""CIFAR ResNets (He et al., CVPR 2016, section 4.2): ResNet-32 and ResNet-110, and any depth 6n+2.

The network is a 3×3 convolution with 16 filters, three stages of ``n`` basic blocks with 16, 32
and 64 channels on 32×32, 16×16 and 8×8 maps (the first block of stages 2 and 3 has stride 2),
global average pooling and a fully connected classifier. ``n = 5`` gives ResNet-32, ``n = 18``
ResNet-110.

The model is a flat ``nn.Sequential`` — ``stem``, ``block_0`` … ``block_{3n-1}``, ``head`` — so that a
planner can cut it between any two blocks, and every block implements the residual protocol
``forward_residual(x) -> (y, r)`` with ``y = shortcut(x) + r`` that TRGL's penalty uses.

Post-activation blocks (the paper's, ``preact=False``) end with a ReLU after the addition, which would
break ``y = shortcut(x) + r``. They are therefore written with that ReLU moved to the *entry* of the next
unit: block k computes ``z_k = shortcut(relu(z_{k-1})) + F(relu(z_{k-1}))``, the stem ends before its
ReLU and the head starts with one. Composed, this is exactly the paper's function (a ReLU per block, in
the same places); only the cut points see the sum before the ReLU instead of after it.
Pre-activation blocks (He et al., ECCV 2016, ``preact=True``) satisfy the protocol as they are.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Shortcut = Literal["A", "B"]


class PadShortcut(nn.Module):
    """Option A: identity on the kept channels, stride-``s`` subsampling, zero channels appended.

    Parameter-free, which is why the paper's CIFAR networks (and their parameter counts) use it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_channels} -> {out_channels})")
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra:
            # F.pad's spec runs from the last dim backwards: (W, W, H, H, C, C); pad channels at the end.
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


def _shortcut(in_channels: int, out_channels: int, stride: int, kind: Shortcut, preact: bool) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(in_channels, out_channels, stride)
    if kind == "B":
        conv = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
        # Post-activation: projection + BN, as torchvision's ResNets do, so both summands are normalised.
        # Pre-activation: the stream between blocks is an un-normalised sum (each branch normalises its own
        # input), so the projection carries no BN either.
        return conv if preact else nn.Sequential(conv, nn.BatchNorm2d(out_channels))
    raise ValueError(f"shortcut must be 'A' or 'B', got {kind!r}")


class BasicBlock(nn.Module):
    """A CIFAR basic block, ``y = shortcut(a(x)) + r(a(x))``, with the residual protocol.

    ``preact=False`` (the paper's block, its trailing ReLU moved to the next unit's entry):
    ``a = ReLU``, ``r = BN(conv3×3(ReLU(BN(conv3×3(·)))))``.
    ``preact=True``: ``a = identity``, ``r = conv3×3(ReLU(BN(conv3×3(ReLU(BN(·))))))``.
    The shortcut is the identity, or when the shape changes option A (subsample, zero-pad channels)
    or option B (1×1 convolution with stride, plus BN in the post-activation block).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *, shortcut: Shortcut = "A",
                 preact: bool = False) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):  # checked here too: identity-shortcut blocks never reach _shortcut's check
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.preact = preact
        # A module, not F.relu in forward, so that llkern.nn.activation_memory.convert() can reach it; it has
        # no state, so the state_dict is the same. Registered first, as it runs first (MODA follows ReLU
        # modules in registration order). Not in place: in a post-activation net x is the previous block's
        # output, which that block's caller (a local loss, a module boundary) may still hold.
        self.entry = nn.Identity() if preact else nn.ReLU()
        conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        if preact:
            self.branch = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(), conv1,
                                        nn.BatchNorm2d(out_channels), nn.ReLU(), conv2)
        else:
            self.branch = nn.Sequential(conv1, nn.BatchNorm2d(out_channels), nn.ReLU(),
                                        conv2, nn.BatchNorm2d(out_channels))
        self.shortcut = _shortcut(in_channels, out_channels, stride, shortcut, preact)

    def _entry(self, x: torch.Tensor) -> torch.Tensor:
        return self.entry(x)

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut path as a function of the block's input: ``y − r`` of :meth:`forward_residual`."""
        return self.shortcut(self._entry(x))

    def forward_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._entry(x)
        r = self.branch(a)
        return self.shortcut(a) + r, r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_residual(x)[0]


def _init_weights(model: nn.Module) -> None:
    # He initialisation (fan-out) for convolutions, as the paper; BN starts as the identity.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cifar_resnet(depth: int = 32, *, num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 shortcut: Shortcut = "A", preact: bool = False) -> nn.Sequential:
    """The CIFAR ResNet of depth ``6n + 2``: stem, ``3n`` :class:`BasicBlock`\\ s, head.

    Args:
        depth: 6n+2 layers (20, 32, 44, 56, 110, …).
        num_classes: classifier outputs.
        in_channels: image channels.
        width: channels of the first stage (the paper: 16); stages have ``width``, ``2·width``, ``4·width``.
        shortcut: ``"A"`` (the paper's CIFAR choice: parameter-free, zero-padded channels) or ``"B"``
            (1×1 projection, + BN in post-activation blocks) where the shape changes; identity elsewhere.
        preact: pre-activation blocks (He et al., ECCV 2016) instead of the original post-activation ones.

    Returns an ``nn.Sequential`` with children ``stem``, ``block_0`` … ``block_{3n-1}``, ``head``; the head is
    ReLU (post-activation) or BN-ReLU (pre-activation), global average pooling, flatten, linear.
    Works on any input size whose sides survive two stride-2 stages (32×32 for CIFAR).
    The default is ResNet-32 with 464,154 parameters (the paper: 0.46 M).
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"cifar_resnet: depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    if preact:
        stem: nn.Module = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        head_act: list[nn.Module] = [nn.BatchNorm2d(4 * width), nn.ReLU()]
    else:
        # The stem's ReLU is applied at block_0's entry (see the module docstring).
        stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        head_act = [nn.ReLU()]
    units: list[tuple[str, nn.Module]] = [("stem", stem)]
    channels = width
    for stage in range(3):
        out_channels = width * 2 ** stage
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            block = BasicBlock(channels, out_channels, stride, shortcut=shortcut, preact=preact)
            units.append((f"block_{len(units) - 1}", block))
            channels = out_channels
    head = nn.Sequential(*head_act, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    units.append(("head", head))
    model = nn.Sequential(OrderedDict(units))
    _init_weights(model)
    return model


def resnet32(*, num_classes: int = 10, in_channels: int = 3, width: int = 16, shortcut: Shortcut = "A",
             preact: bool = False) -> nn.Sequential:
    """CIFAR ResNet-32 (n = 5, 15 blocks): 464,154 parameters by default (the paper: 0.46 M).

    With ``shortcut="B"``: 466,906. See :func:`cifar_resnet` for the arguments and the layout.
    """
    return cifar_resnet(32, num_classes=num_classes, in_channels=in_channels, width=width, shortcut=shortcut,
                        preact=preact)


def resnet110(*, num_classes: int = 10, in_channels: int = 3, width: int = 16, shortcut: Shortcut = "A",
              preact: bool = False) -> nn.Sequential:
    """CIFAR ResNet-110 (n = 18, 54 blocks): 1,727,962 parameters by default (the paper: 1.7 M).

    With ``shortcut="B"``: 1,730,714. See :func:`cifar_resnet` for the arguments and the layout.
    """
    return cifar_resnet(110, num_classes=num_classes, in_channels=in_channels, width=width, shortcut=shortcut,
                        preact=preact)
