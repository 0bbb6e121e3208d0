"""The fused path of UpsampleConvBlock: upsample×2 → conv3×3 with BatchNorm's batch moments
(upsample_conv_moments), then normalise + LeakyReLU in one pass (bn_lrelu), with nn.BatchNorm2d's
train/eval semantics, running-statistics update included."""

from __future__ import annotations

import torch
from torch import nn

from madfast.ops.upsample_conv.aten_path import bn_lrelu_aten
from madfast.ops.bn_lrelu import bn_lrelu, fold_bn
from madfast.ops.upsample_conv.op import upsample_conv_moments

__all__ = ["upsample_conv_bn_lrelu"]


def upsample_conv_bn_lrelu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, negative_slope: float,
                           backend: str) -> torch.Tensor:
    """What ``Sequential(UpsamplingBilinear2d(2), conv, bn, LeakyReLU(negative_slope))`` computes,
    including bn's running-statistics update; conv must have no bias."""
    batch_stats = bn.training or bn.running_mean is None
    weight = conv.weight
    if torch.is_autocast_enabled(x.device.type):
        # As nn.Conv2d under autocast: the convolution in the autocast dtype (custom ops are not
        # cast by autocast itself); BN's statistics and parameters stay fp32.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    y, mean, var = upsample_conv_moments(x, weight, stats=batch_stats, backend=backend)
    if batch_stats:  # var is biased, as BN normalises with
        count = y.numel() // y.shape[1]
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                # nn.BatchNorm2d: momentum None means a cumulative average
                factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
                bn.running_var.lerp_((var * (count / max(count - 1, 1))).to(bn.running_var.dtype), factor)
    else:
        mean, var = bn.running_mean, bn.running_var
    if backend == "aten":  # BatchNorm's backward rounded once: the stats' gradients folded in fp32
        return bn_lrelu_aten(y, mean, var, bn.weight, bn.bias, bn.eps, negative_slope, batch_stats)
    _, scale, shift = fold_bn(mean, var, bn.weight, bn.bias, bn.eps)
    return bn_lrelu(y, scale, shift, negative_slope, backend)

