"""The fused path of UpsampleConvBlock: upsample×2 → conv3×3 with BatchNorm's sums in the GEMM
epilogue (madfast.ops.upsample_conv), then normalise + LeakyReLU in one pass (bn_lrelu), keeping
nn.BatchNorm2d's semantics (batch statistics and running-stat update in train mode, running
stats in eval)."""

from __future__ import annotations

import torch
from torch import nn

from madfast.ops.upsample_conv import upsample_conv
from madfast.ops.upsample_conv.bn_lrelu import bn_lrelu

__all__ = ["upsample_conv_bn_lrelu"]


def upsample_conv_bn_lrelu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, negative_slope: float,
                           backend: str) -> torch.Tensor:
    """What ``Sequential(UpsamplingBilinear2d(2), conv, bn, LeakyReLU(negative_slope))`` computes,
    including bn's running-statistics update; conv must have no bias."""
    batch_stats = bn.training or bn.running_mean is None
    y, total, total_sq = upsample_conv(x, conv.weight, stats=batch_stats, backend=backend)
    if batch_stats:
        count = y.numel() // y.shape[1]
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0)  # biased, as BN normalises with
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                # nn.BatchNorm2d: momentum None means a cumulative average
                factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
                bn.running_var.lerp_((var * (count / max(count - 1, 1))).to(bn.running_var.dtype), factor)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var.float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return bn_lrelu(y, scale, shift, negative_slope, backend)
