"""Wide ResNets WRN-depth-width (Zagoruyko & Komodakis) for 32 px inputs, without dropout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WideResNet", "wrn"]


class WideBlock(nn.Module):
    """Pre-activation block: BN → ReLU → conv3×3 → BN → ReLU → conv3×3, 1×1 conv shortcut on change."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = (None if in_planes == planes and stride == 1
                         else nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int = 10, channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            stages.append(nn.Sequential(*(WideBlock(in_planes if j == 0 else planes, planes,
                                                    (1 if i == 0 else 2) if j == 0 else 1) for j in range(n))))
            in_planes = planes
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def wrn(depth: int, width: int, num_classes: int = 10, channels: int = 3) -> WideResNet:
    return WideResNet(depth, width, num_classes, channels)
