"""Torch reference of DeepInversion's BatchNorm-statistics loss for one BN layer's input."""

from __future__ import annotations

import torch

from madfast.ops._dtypes import acc_dtype

__all__ = ["torch_bn_stat_loss"]


def torch_bn_stat_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """‖mean_c(x) − running_mean‖₂ + ‖var_c(x) − running_var‖₂ over (N, H, W), biased var, in fp32."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    mean = xf.mean(dim=(0, 2, 3))
    var = xf.var(dim=(0, 2, 3), unbiased=False)
    loss = torch.linalg.vector_norm(mean - running_mean.to(acc)) + torch.linalg.vector_norm(var - running_var.to(acc))
    return loss.to(x.dtype)
