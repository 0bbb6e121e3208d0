"""Modules built on madfast's ops."""

from madfast.nn.ema import FusedEMA, ema_multi_avg_fn
from madfast.nn.losses import AdversarialLoss, BNStatHook, KLDivLoss
from madfast.nn.upsample_block import UpsampleConvBlock

__all__ = ["FusedEMA", "ema_multi_avg_fn", "KLDivLoss", "AdversarialLoss", "BNStatHook", "UpsampleConvBlock"]
