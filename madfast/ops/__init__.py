"""madfast's fused ops. Each lives in its own folder: torch reference, Triton kernel and
registration side by side; C++/CUDA kernels in csrc/."""

from madfast.ops.adversarial import adversarial_loss
from madfast.ops.bn_stats import bn_stat_loss
from madfast.ops.ema import ema_update_
from madfast.ops.kl import kl_div

__all__ = ["ema_update_", "kl_div", "adversarial_loss", "bn_stat_loss"]
