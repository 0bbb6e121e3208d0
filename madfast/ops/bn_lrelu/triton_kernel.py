"""Triton kernel of bn_lrelu: one program per (channel, split of N·H·W); the backward adds each
split's partial sums of the scale and shift gradients with tl.atomic_add (order depends on scheduling
on a GPU: madfast._backend.OPS marks it nondeterministic)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from madfast.ops._dtypes import acc_dtype
from madfast.ops._triton import TL_DTYPES
from madfast.ops.bn_stats.triton_kernel import moments_view

__all__ = ["triton_bn_lrelu"]

BLOCK = 1024
MAX_SPLIT = 8  # programs per channel: a long M = N·H·W is split so that few channels still fill a GPU


@triton.jit
def _bn_lrelu_kernel(
    y_ptr, out_ptr, g_ptr, gy_ptr,  # (N, C, H, W) with strides s_n, s_c, s_hw (out, g, gy: y's layout)
    scale_ptr, shift_ptr, gscale_ptr, gshift_ptr,  # (C,) in ACC; the gradients zeroed
    N, HW, s_n, s_c, s_hw, slope, splits,
    BACKWARD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    M = N * HW
    chunk = tl.cdiv(M, splits)
    scale = tl.load(scale_ptr + c)
    shift = tl.load(shift_ptr + c)
    acc_scale = tl.zeros((BLOCK,), ACC)  # fp32; fp64 for fp64 y
    acc_shift = tl.zeros((BLOCK,), ACC)
    for start in range(part * chunk, tl.minimum(part * chunk + chunk, M), BLOCK):
        i = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = (i < M) & (i < part * chunk + chunk)
        n = i // HW
        off = n * s_n + c * s_c + (i - n * HW) * s_hw
        y = tl.load(y_ptr + off, mask=mask, other=0.0).to(ACC)
        z = y * scale + shift
        if BACKWARD:
            g = tl.load(g_ptr + off, mask=mask, other=0.0).to(ACC)
            gz = tl.where(z > 0, g, g * slope)
            tl.store(gy_ptr + off, (gz * scale).to(gy_ptr.dtype.element_ty), mask=mask)
            acc_scale += tl.where(mask, gz * y, 0.0)
            acc_shift += tl.where(mask, gz, 0.0)
        else:
            tl.store(out_ptr + off, tl.where(z > 0, z, z * slope).to(out_ptr.dtype.element_ty), mask=mask)
    if BACKWARD:
        tl.atomic_add(gscale_ptr + c, tl.sum(acc_scale, 0).to(gscale_ptr.dtype.element_ty))
        tl.atomic_add(gshift_ptr + c, tl.sum(acc_shift, 0).to(gshift_ptr.dtype.element_ty))


def triton_bn_lrelu(y, scale, shift, slope, grad=None):
    """Forward (``grad`` None): (LeakyReLU(y·scale + shift), zeros, zeros). Backward: (grad_y, the
    gradients of scale and shift). grad_y/out in y's layout, the (C,) sums in the accumulation dtype."""
    y, s_n, s_c, s_hw, channels_last = moments_view(y)
    N, C, H, W = y.shape
    out = torch.empty_like(y)
    acc = acc_dtype(y.dtype)
    g_scale = torch.zeros(C, dtype=acc, device=y.device)
    g_shift = torch.zeros_like(g_scale)
    if y.numel():
        g = y if grad is None else grad.contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        splits = min(MAX_SPLIT, triton.cdiv(N * H * W, BLOCK))
        _bn_lrelu_kernel[(C, splits)](
            y, out, g, out, scale.to(acc).contiguous(), shift.to(acc).contiguous(), g_scale, g_shift,
            N, H * W, s_n, s_c, s_hw, float(slope), splits, BACKWARD=grad is not None,
            ACC=TL_DTYPES[acc], BLOCK=BLOCK)
    return out, g_scale, g_shift
