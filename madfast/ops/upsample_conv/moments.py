"""BatchNorm's batch moments of y (N, C, H, W) per channel — mean and biased variance — without the
E[y²]−E[y]² cancellation: Welford within a block of values, Chan's formula across blocks, partials
combined in a fixed order (deterministic: no atomics).

ATen's var_mean is such a one-pass Welford reduction; for bf16/fp16 on CUDA the BN-statistics
Triton kernels (madfast.ops.bn_stats.triton_kernel) do the same reading y once in its own dtype,
coalesced along C when y is channels_last, instead of an fp32 copy.
"""

from __future__ import annotations

import importlib.util

import torch

from madfast import _backend
from madfast.ops._dtypes import acc_dtype

__all__ = ["channel_moments", "torch_channel_moments", "chan_combine"]


def torch_channel_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel in fp32 (fp64 for fp64), by ATen's Welford reduction."""
    var, mean = torch.var_mean(y.to(acc_dtype(y.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def chan_combine(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chan et al.'s parallel combination of T partials (counts (T,), means and M2 = Σ(y − mean)²
    (T, C)) into (mean, biased variance) per channel, summed over T in a fixed order."""
    counts = counts.to(means.dtype).view(-1, 1)
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / total


if importlib.util.find_spec("triton") is not None:
    from madfast.ops.bn_stats.triton_kernel import triton_channel_moments


def channel_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) of y (N, C, H, W) per channel, fp32 (fp64 for fp64)."""
    if y.is_cuda and y.dtype in (torch.float16, torch.bfloat16) and y.numel() and _backend.triton_usable(y.device):
        return triton_channel_moments(y)
    return torch_channel_moments(y)
