"""Triton kernels of the per-channel moments of x (N, C, H, W) and their backward.

Moments: one program per channel, shifted sums (x − pivot) so that E[x²] − E[x]² does not
cancel when |mean| ≫ std, accumulated in fp64 (a lane adds M/BLOCK terms); one read of x.
Backward: grad_x = a_c + b_c·x in x's memory order, one read and one write. Contiguous and channels_last inputs are read in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from madfast.ops._dtypes import acc_dtype
from madfast.ops._layout import kernel_memory_format
from madfast.ops._triton import TL_DTYPES

__all__ = ["triton_channel_moments", "triton_channel_moments_backward", "moments_view"]

BLOCK = 1024


def moments_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, bool]:
    """(x readable in place, stride of N, stride of C, stride of HW, channels_last)."""
    channels_last = kernel_memory_format(x) == torch.channels_last
    if not (x.is_contiguous() or channels_last):
        x = x.contiguous()
    C = x.shape[1]
    s_hw = C if channels_last else 1  # a size-1 W may carry any stride: use the layout's
    return x, x.stride(0), x.stride(1), s_hw, channels_last



@triton.jit
def _moments_kernel(
    x_ptr,  # (N, C, H, W) with strides s_n, s_c, s_hw (HW flattened)
    mean_ptr, var_ptr,  # (C,) fp32/fp64
    N, HW, s_n, s_c, s_hw,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    base = x_ptr + c * s_c
    M = N * HW
    pivot = tl.load(base).to(ACC)
    s1 = tl.zeros((BLOCK,), tl.float64)
    s2 = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, M, BLOCK):
        i = start + tl.arange(0, BLOCK).to(tl.int64)
        n = i // HW
        mask = i < M
        d = tl.where(mask, tl.load(base + n * s_n + (i - n * HW) * s_hw, mask=mask, other=0.0).to(ACC) - pivot, 0.0)
        d = d.to(tl.float64)
        s1 += d
        s2 += d * d
    m1 = tl.sum(s1, 0) / M
    tl.store(mean_ptr + c, (pivot.to(tl.float64) + m1).to(ACC))
    tl.store(var_ptr + c, (tl.sum(s2, 0) / M - m1 * m1).to(ACC))


@triton.jit
def _moments_backward_kernel(
    x_ptr, out_ptr,  # numel elements in memory order (out has x's layout)
    gm_ptr, gv_ptr, mean_ptr,  # (C,) fp32/fp64
    numel, C, HW, inv_m,
    CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    c = i % C if CHANNELS_LAST else (i // HW) % C
    gm = tl.load(gm_ptr + c, mask=mask, other=0.0)
    gv = tl.load(gv_ptr + c, mask=mask, other=0.0)
    mu = tl.load(mean_ptr + c, mask=mask, other=0.0)
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + i, (gm * inv_m + 2.0 * gv * inv_m * (x - mu)).to(out_ptr.dtype.element_ty), mask=mask)


def triton_channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (N, C, H, W); arguments already validated."""
    x, s_n, s_c, s_hw, _ = moments_view(x)
    N, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    mean = torch.empty(C, dtype=acc, device=x.device)
    var = torch.empty(C, dtype=acc, device=x.device)
    if C == 0:
        return mean, var
    if N * H * W == 0:
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    _moments_kernel[(C,)](
        x, mean, var, N, H * W, s_n, s_c, s_hw, ACC=TL_DTYPES[acc], BLOCK=BLOCK, num_warps=8)
    return mean, var


def triton_channel_moments_backward(grad_mean: torch.Tensor, grad_var: torch.Tensor, x: torch.Tensor,
                                    mean: torch.Tensor) -> torch.Tensor:
    """grad_x from the gradients of the (C,) mean and variance."""
    x, _, _, _, channels_last = moments_view(x)
    N, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    out = torch.empty_like(x)  # keeps x's layout, so memory orders match
    if x.numel() == 0:
        return out
    _moments_backward_kernel[(triton.cdiv(x.numel(), BLOCK),)](
        x, out, grad_mean.to(acc).contiguous(), grad_var.to(acc).contiguous(), mean.to(acc).contiguous(),
        x.numel(), C, H * W, 1.0 / (N * H * W), CHANNELS_LAST=channels_last, ACC=TL_DTYPES[acc], BLOCK=BLOCK,
        num_warps=4)
    return out
