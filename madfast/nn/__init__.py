"""Modules built on madfast's ops."""

from madfast.nn.ema import FusedEMA, ema_multi_avg_fn

__all__ = ["FusedEMA", "ema_multi_avg_fn"]
