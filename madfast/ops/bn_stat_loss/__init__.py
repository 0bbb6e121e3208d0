"""DeepInversion's BatchNorm-statistics loss."""

from madfast.ops.bn_stat_loss.op import bn_stat_loss
from madfast.ops.bn_stat_loss.reference import torch_bn_stat_loss

__all__ = ["bn_stat_loss", "torch_bn_stat_loss"]
