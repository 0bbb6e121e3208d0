"""The demo's teacher/student pair: a 3-conv CNN with BatchNorm, the student at half width."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """conv-BN-ReLU-pool ×2 → conv-BN-ReLU → global average pool → linear; widths w, 2w, 4w."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 32):
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*stage(channels, width), nn.MaxPool2d(2), *stage(width, 2 * width),
                                      nn.MaxPool2d(2), *stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))
