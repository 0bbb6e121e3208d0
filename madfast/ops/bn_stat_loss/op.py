"""madfast.ops.bn_stat_loss: validation, backend choice and registration."""

from __future__ import annotations

import torch

from madfast import _backend
from madfast.ops._checks import check_floating
from madfast.ops.bn_stat_loss.reference import torch_bn_stat_loss

__all__ = ["bn_stat_loss"]


def check_bn_args(x, running_mean, running_var) -> None:
    op = "bn_stat_loss"
    check_floating(op, "x", x, ndim=4)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        check_floating(op, name, t, ndim=1)
        if t.shape[0] != x.shape[1]:
            raise ValueError(f"{op}: {name} has {t.shape[0]} entries but x has {x.shape[1]} channels")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def bn_stat_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, *,
                 backend: str = "auto") -> torch.Tensor:
    """DeepInversion's regulariser for one BatchNorm layer's input, with gradient to x.

    Args:
        x: (N, C, H, W), contiguous or channels_last.
        running_mean, running_var: (C,) the layer's running statistics (no gradient).
    Returns:
        ‖mean_c(x) − running_mean‖₂ + ‖var_c(x) − running_var‖₂ (biased variance over N, H, W),
        a 0-d tensor in x's dtype.
    """
    check_bn_args(x, running_mean, running_var)
    _backend.choose("bn_stat_loss", backend, x.device)
    return torch_bn_stat_loss(x, running_mean, running_var)
