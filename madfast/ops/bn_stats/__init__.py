"""DeepInversion's BatchNorm-statistics loss over fused per-channel moments."""

from madfast.ops.bn_stats.op import bn_stat_loss, bn_stat_losses, channel_moments
from madfast.ops.bn_stats.reference import torch_bn_stat_loss

__all__ = ["bn_stat_loss", "bn_stat_losses", "channel_moments", "torch_bn_stat_loss"]
