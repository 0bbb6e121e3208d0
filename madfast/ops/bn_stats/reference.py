"""Torch references: per-channel batch moments (one-pass Welford, never E[x²]−E[x]²), Chan's merge
of partial moments, and DeepInversion's BatchNorm-statistics loss for one BN layer's input."""

from __future__ import annotations

import torch

from madfast.ops._dtypes import acc_dtype

__all__ = ["torch_bn_stat_loss", "torch_channel_moments", "chan_combine"]


def torch_channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) of x (N, C, H, W) per channel in fp32 (fp64 for fp64), by ATen's
    one-pass Welford reduction."""
    var, mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def chan_combine(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan et al.'s parallel combination of T partials (counts (T,), means and M2 = Σ(x − mean)²
    (T, C)) into (mean, biased variance) per channel, summed over T in a fixed order."""
    counts = counts.to(means.dtype).view(-1, 1)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / total


def torch_bn_stat_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """‖mean_c(x) − running_mean‖₂ + ‖var_c(x) − running_var‖₂ over (N, H, W), biased var, in fp32."""
    acc = acc_dtype(x.dtype)
    mean, var = torch_channel_moments(x)
    loss = torch.linalg.vector_norm(mean - running_mean.to(acc)) + torch.linalg.vector_norm(var - running_var.to(acc))
    return loss.to(x.dtype)
