"""CIFAR ResNets (He et al. 2016, sec. 4.2): depth 6n+2, three stages of n basic blocks, widths 16/32/64.

Shortcut "A": identity, and on a downsampling block a stride-2 subsample zero-padded to the new
width (no parameters, the paper's CIFAR choice); "B": a 1x1 conv + BN projection there.
preact=True gives the pre-activation blocks of He et al. 2016b ("Identity mappings").
Works for any (C, H, W) input: the stem keeps the resolution and the head pools globally.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fqtrun.models import shape_of

WIDTHS = (16, 32, 64)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A: subsample by `stride` and zero-pad the channels from cin to cout (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.extra, self.stride = cout - cin, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


def _shortcut(cin: int, cout: int, stride: int, kind: str, bn: bool) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(cin, cout, stride)
    conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout)) if bn else conv


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride, shortcut, bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """conv(relu(bn(conv(relu(bn(x)))))) + shortcut; a projection shortcut takes the activated input."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.shortcut = _shortcut(cin, cout, stride, shortcut, bn=False)
        self.project = not isinstance(self.shortcut, (nn.Identity, PadShortcut))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + self.shortcut(act if self.project else x)


class ResNetCifar(nn.Module):
    """resnet{depth} for CIFAR-sized inputs; depth = 6n + 2 (20, 32, 44, 56, 74, 110, ...)."""

    def __init__(self, num_classes: int, input_shape: Sequence[int], depth: int = 20, shortcut: str = "A",
                 preact: bool = False):
        super().__init__()
        cin = shape_of(input_shape, "resnet_cifar", (3,))[0]
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"model.depth={depth} must be 6n+2 with n >= 1 (20, 32, 44, 56, 74, 110)")
        if shortcut not in ("A", "B"):
            raise ValueError(f"model.shortcut={shortcut!r} must be 'A' (zero-pad) or 'B' (1x1 projection)")
        n = (depth - 2) // 6
        block = PreActBlock if preact else BasicBlock
        self.preact = preact
        self.conv1 = _conv3x3(cin, WIDTHS[0])
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(WIDTHS[0])
        stages, width = [], WIDTHS[0]
        for i, w in enumerate(WIDTHS):
            for j in range(n):
                stages.append(block(width, w, 2 if (i > 0 and j == 0) else 1, shortcut))
                width = w
        self.stages = nn.Sequential(*stages)
        self.bn_final = nn.BatchNorm2d(width) if preact else nn.Identity()  # preact nets end with BN-ReLU
        self.head = nn.Linear(width, int(num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = h if self.preact else F.relu(self.bn1(h))
        h = self.stages(h)
        if self.preact:
            h = F.relu(self.bn_final(h))
        return self.head(h.mean(dim=(2, 3)))  # global average pool -> (B, 64)
