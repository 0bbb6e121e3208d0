"""The fused multi-tensor EMA update."""

from madfast.ops.ema.op import check_ema_args, ema_update_
from madfast.ops.ema.reference import torch_ema_update_

__all__ = ["ema_update_", "check_ema_args", "torch_ema_update_"]
