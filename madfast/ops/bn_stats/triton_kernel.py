"""Triton kernels of the per-channel moments of x (N, C, H, W) and their backward.

Moments in fp32 (fp64 only for fp64 inputs) from chunk partials: each chunk's count, mean and M2
(two passes over the chunk in registers, Σd² − (Σd)²/n correcting the chunk mean's rounding),
merged with Chan's formula in a fixed order — exact when |mean| ≫ std, deterministic.
NCHW: a program per channel reads contiguous H×W runs (no index division per element).
channels_last: a program per tile of channels reads positions × channels tiles coalesced along C.
Backward: grad_x = gm_c/M + (2·gv_c/M)(x − mean_c), one read and one write in x's memory order,
the channel index formed once per program (NCHW) or along the tile (channels_last).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from madfast.ops._dtypes import acc_dtype
from madfast.ops._layout import kernel_memory_format
from madfast.ops._triton import TL_DTYPES

__all__ = ["triton_channel_moments", "triton_channel_moments_backward", "moments_view"]

BLOCK = 1024  # NCHW: elements per chunk
BLOCK_P, BLOCK_C = 64, 32  # channels_last: positions × channels per tile


def moments_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int, bool]:
    """(x readable in place, stride of N, stride of C, stride of HW, channels_last)."""
    channels_last = kernel_memory_format(x) == torch.channels_last
    if not (x.is_contiguous() or channels_last):
        x = x.contiguous()
    C = x.shape[1]
    s_hw = C if channels_last else 1  # a size-1 W may carry any stride: use the layout's
    return x, x.stride(0), x.stride(1), s_hw, channels_last


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.: (count, mean, M2) of the union of two disjoint sets (n_b > 0)."""
    n = n_a + n_b
    fb = n_b / n
    d = mean_b - mean_a
    return n, mean_a + d * fb, m2_a + m2_b + d * d * n_a * fb


@triton.jit
def _moments_nchw_kernel(
    x_ptr,  # (N, C, HW) contiguous H×W runs, strides s_n, s_c
    mean_ptr, var_ptr,  # (C,) fp32/fp64
    N, HW, s_n, s_c,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    cnt = tl.zeros((), ACC)
    mean = tl.zeros((), ACC)
    m2 = tl.zeros((), ACC)
    base = x_ptr + c * s_c
    for n in range(0, N):
        for start in range(0, HW, BLOCK):
            i = start + tl.arange(0, BLOCK)
            mask = i < HW
            x = tl.load(base + i, mask=mask, other=0.0).to(ACC)
            k = tl.minimum(HW - start, BLOCK).to(ACC)
            m = tl.sum(x, 0) / k
            d = tl.where(mask, x - m, 0.0)
            s1 = tl.sum(d, 0)
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, k, m + s1 / k, tl.maximum(tl.sum(d * d, 0) - s1 * s1 / k, 0.0))
        base += s_n  # pointer arithmetic: 64-bit whatever N·s_n
    tl.store(mean_ptr + c, mean)
    tl.store(var_ptr + c, m2 / cnt)


@triton.jit
def _moments_cl_kernel(
    x_ptr,  # (M, C) positions × channels, C contiguous (channels_last)
    mean_ptr, var_ptr,  # (C,) fp32/fp64
    M, C,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    cnt = tl.zeros((BLOCK_C,), ACC)
    mean = tl.zeros((BLOCK_C,), ACC)
    m2 = tl.zeros((BLOCK_C,), ACC)
    for start in range(0, M, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P).to(tl.int64)
        mask = (p[:, None] < M) & c_ok[None, :]
        x = tl.load(x_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
        k = tl.minimum(M - start, BLOCK_P).to(ACC)
        m = tl.sum(x, 0) / k
        d = tl.where(mask, x - m[None, :], 0.0)
        s1 = tl.sum(d, 0)
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, k, m + s1 / k, tl.maximum(tl.sum(d * d, 0) - s1 * s1 / k, 0.0))
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(var_ptr + c, m2 / cnt, mask=c_ok)


@triton.jit
def _backward_nchw_kernel(
    x_ptr, out_ptr,  # (N·C, HW) rows of H×W values (out has x's layout)
    gm_ptr, gv_ptr, mean_ptr,  # (C,) fp32/fp64
    C, HW, inv_m,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = row % C  # once per program
    a = tl.load(gm_ptr + c) * inv_m
    b = 2.0 * tl.load(gv_ptr + c) * inv_m
    mu = tl.load(mean_ptr + c)
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < HW
    x = tl.load(x_ptr + row * HW + i, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + row * HW + i, (a + b * (x - mu)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_cl_kernel(
    x_ptr, out_ptr,  # (M, C) positions × channels (out has x's layout)
    gm_ptr, gv_ptr, mean_ptr,  # (C,) fp32/fp64
    M, C, inv_m,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    a = tl.load(gm_ptr + c, mask=c_ok, other=0.0) * inv_m
    b = 2.0 * tl.load(gv_ptr + c, mask=c_ok, other=0.0) * inv_m
    mu = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    mask = (p[:, None] < M) & c_ok[None, :]
    offs = p[:, None] * C + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offs, (a[None, :] + b[None, :] * (x - mu[None, :])).to(out_ptr.dtype.element_ty), mask=mask)


def triton_channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (N, C, H, W); arguments already validated."""
    x, s_n, s_c, _, channels_last = moments_view(x)
    N, C, H, W = x.shape
    acc = acc_dtype(x.dtype)
    mean = torch.empty(C, dtype=acc, device=x.device)
    var = torch.empty(C, dtype=acc, device=x.device)
    if C == 0:
        return mean, var
    if N * H * W == 0:
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    if channels_last:
        _moments_cl_kernel[(triton.cdiv(C, BLOCK_C),)](
            x, mean, var, N * H * W, C, ACC=TL_DTYPES[acc], BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4)
    else:
        _moments_nchw_kernel[(C,)](x, mean, var, N, H * W, s_n, s_c, ACC=TL_DTYPES[acc], BLOCK=BLOCK, num_warps=8)
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
    args = (grad_mean.to(acc).contiguous(), grad_var.to(acc).contiguous(), mean.to(acc).contiguous())
    if channels_last:
        M = N * H * W
        _backward_cl_kernel[(triton.cdiv(M, BLOCK_P), triton.cdiv(C, BLOCK_C))](
            x, out, *args, M, C, 1.0 / M, ACC=TL_DTYPES[acc], BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4)
    else:
        _backward_nchw_kernel[(N * C, triton.cdiv(H * W, BLOCK))](
            x, out, *args, C, H * W, 1.0 / (N * H * W), ACC=TL_DTYPES[acc], BLOCK=BLOCK, num_warps=4)
    return out
