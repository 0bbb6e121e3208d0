"""The fused multi-tensor EMA update."""

from madfast.ops.ema.op import ema_update_
from madfast.ops.ema.reference import torch_ema_update_

__all__ = ["ema_update_", "torch_ema_update_"]
