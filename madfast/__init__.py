"""madfast: fused kernels and a trainer for Momentum Adversarial Distillation (MAD)."""

from madfast import _backend, models, nn, ops
from madfast._backend import BackendUnavailableError
from madfast.nn import FusedEMA, ema_multi_avg_fn

__version__ = "0.1.0"
__all__ = ["ops", "nn", "models", "FusedEMA", "ema_multi_avg_fn", "BackendUnavailableError", "__version__"]
