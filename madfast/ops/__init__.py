"""madfast's fused ops. Each lives in its own folder: torch reference, Triton kernel and
registration side by side; C++/CUDA kernels in csrc/."""

from madfast.ops.ema import ema_update_

__all__ = ["ema_update_"]
