"""Torch reference of the generator block's convolution part: bilinear ×2 upsample
(align_corners=True, as nn.UpsamplingBilinear2d) followed by a 3×3 convolution, stride 1, pad 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["torch_upsample_conv"]


def torch_upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv3×3(upsample×2(x)); x (N, Cin, H, W), weight (Cout, Cin, 3, 3) → (N, Cout, 2H, 2W)."""
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    return F.conv2d(up, weight, bias, stride=1, padding=1)
