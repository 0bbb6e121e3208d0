"""BatchNorm's batch moments of y (N, C, H, W) per channel — mean and biased variance — without the
E[y²]−E[y]² cancellation: Welford within a block of values, Chan's formula across blocks, partials
combined in a fixed order (deterministic: no atomics).

ATen's var_mean is such a one-pass Welford reduction; the Triton kernel is the same for bf16/fp16
on CUDA, where it reads y once in its own dtype instead of an fp32 copy.
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
    import triton
    import triton.language as tl

    from madfast.ops.bn_stats.triton_kernel import moments_view

    @triton.jit
    def _welford_partials_kernel(
        y_ptr,  # (N, C, H, W) with strides s_n, s_c, s_hw
        mean_ptr, m2_ptr,  # (splits, C) fp32 partials
        N, HW, s_n, s_c, s_hw, splits, C,
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        M = N * HW
        chunk = tl.cdiv(M, splits)
        lo = part * chunk
        hi = tl.minimum(lo + chunk, M)
        # values are taken relative to the split's first one, so that the block sums stay small
        n0 = lo // HW
        pivot = tl.load(y_ptr + n0 * s_n + c * s_c + (lo - n0 * HW) * s_hw, mask=lo < hi, other=0.0).to(tl.float32)
        count = tl.full((), 0.0, tl.float32)  # loop-carried fp32 scalars
        mean = tl.full((), 0.0, tl.float32)
        m2 = tl.full((), 0.0, tl.float32)
        for start in range(lo, hi, BLOCK):
            i = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = i < hi
            n = i // HW
            y = tl.load(y_ptr + n * s_n + c * s_c + (i - n * HW) * s_hw, mask=mask, other=0.0).to(tl.float32)
            y = tl.where(mask, y - pivot, 0.0)
            nb = tl.sum(mask.to(tl.float32), 0)
            mb = tl.sum(y, 0) / nb
            d = tl.where(mask, y - mb, 0.0)
            m2b = tl.sum(d * d, 0)
            # Chan: merge the block (nb, mb, m2b) into the running (count, mean, m2)
            delta = mb - mean
            new = count + nb
            mean += delta * (nb / new)
            m2 += m2b + delta * delta * (count * nb / new)
            count = new
        tl.store(mean_ptr + part * C + c, mean + pivot)
        tl.store(m2_ptr + part * C + c, m2)

    def triton_channel_moments(y: torch.Tensor, block: int = 1024, max_split: int = 16):
        """As torch_channel_moments (fp32 moments; fp64 input is not taken here), C × splits programs."""
        y, s_n, s_c, s_hw, _ = moments_view(y)
        N, C, H, W = y.shape
        M = N * H * W
        splits = max(1, min(max_split, triton.cdiv(M, block)))
        chunk = triton.cdiv(M, splits)
        means = torch.empty((splits, C), dtype=torch.float32, device=y.device)
        m2s = torch.empty_like(means)
        _welford_partials_kernel[(C, splits)](y, means, m2s, N, H * W, s_n, s_c, s_hw, splits, C, BLOCK=block)
        counts = (M - torch.arange(splits, device=y.device) * chunk).clamp(0, chunk)
        return chan_combine(counts, means, m2s)


def channel_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) of y (N, C, H, W) per channel, fp32 (fp64 for fp64)."""
    if y.is_cuda and y.dtype in (torch.float16, torch.bfloat16) and y.numel() and _backend.triton_usable(y.device):
        return triton_channel_moments(y)
    return torch_channel_moments(y)
