"""Triton kernel of conv3×3(bilinear-upsample×2(x)) as an implicit GEMM that never writes the
upsampled tensor: the A-operand loader reads the low-resolution x and interpolates on the fly
(four gathers per element, align_corners=True weights), and the epilogue accumulates the
per-channel sums BatchNorm needs (Σy, Σy²) with atomics.

GEMM view: M = N·OH·OW output pixels, K = Cin·9 taps, N = Cout channels.
Status: forward only, correctness-tested under the CPU interpreter; not yet tuned on a GPU
(no GPU lent so far), so the module does not take this path by default.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["triton_upsample_conv_fwd"]


@triton.jit
def _upsample_conv_fwd_kernel(
    x_ptr,  # (N, Cin, H, W), strides sx_*
    w_ptr,  # (Cout, Cin·9) contiguous
    y_ptr,  # (N, Cout, OH, OW), strides sy_*
    sum_ptr, sumsq_ptr,  # (Cout,) fp32, zero-initialised; Σy and Σy² over N·OH·OW
    NB, Cin, H, W, Cout, OH, OW, scale_h, scale_w,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
    STATS: tl.constexpr, LOWP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < NB * OH * OW
    co_ok = co < Cout
    n = m // (OH * OW)
    oh = (m // OW) % OH
    ow = m % OW
    K = Cin * 9
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ci = k // 9
        kh = (k % 9) // 3
        kw = k % 3
        u = oh[:, None] + kh[None, :] - 1  # row in the upsampled image
        v = ow[:, None] + kw[None, :] - 1
        ok = m_ok[:, None] & (k < K)[None, :] & (u >= 0) & (u < OH) & (v >= 0) & (v < OW)
        src_h = u.to(tl.float32) * scale_h
        src_w = v.to(tl.float32) * scale_w
        h0 = tl.minimum(tl.maximum(src_h.to(tl.int32), 0), H - 1)  # src ≥ 0 wherever ok
        w0 = tl.minimum(tl.maximum(src_w.to(tl.int32), 0), W - 1)
        h1 = tl.minimum(h0 + 1, H - 1)
        w1 = tl.minimum(w0 + 1, W - 1)
        lh = src_h - h0.to(tl.float32)
        lw = src_w - w0.to(tl.float32)
        base = x_ptr + n[:, None] * sx_n + ci[None, :] * sx_c
        x00 = tl.load(base + h0 * sx_h + w0 * sx_w, mask=ok, other=0.0).to(tl.float32)
        x01 = tl.load(base + h0 * sx_h + w1 * sx_w, mask=ok, other=0.0).to(tl.float32)
        x10 = tl.load(base + h1 * sx_h + w0 * sx_w, mask=ok, other=0.0).to(tl.float32)
        x11 = tl.load(base + h1 * sx_h + w1 * sx_w, mask=ok, other=0.0).to(tl.float32)
        a = (1 - lh) * ((1 - lw) * x00 + lw * x01) + lh * ((1 - lw) * x10 + lw * x11)
        b = tl.load(w_ptr + co[None, :] * K + k[:, None], mask=co_ok[None, :] & (k < K)[:, None], other=0.0)
        if LOWP:  # tensor cores in the input precision, fp32 accumulation
            acc += tl.dot(a.to(b.dtype), b)
        else:
            acc += tl.dot(a, b.to(tl.float32), input_precision="ieee")
    out = acc.to(y_ptr.dtype.element_ty)
    y_off = n[:, None] * sy_n + co[None, :] * sy_c + oh[:, None] * sy_h + ow[:, None] * sy_w
    keep = m_ok[:, None] & co_ok[None, :]
    tl.store(y_ptr + y_off, out, mask=keep)
    if STATS:  # BatchNorm's batch statistics of the stored (rounded) values
        yv = tl.where(keep, out.to(tl.float32), 0.0)
        tl.atomic_add(sum_ptr + co, tl.sum(yv, 0), mask=co_ok)
        tl.atomic_add(sumsq_ptr + co, tl.sum(yv * yv, 0), mask=co_ok)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_upsample_conv_fwd(x: torch.Tensor, weight: torch.Tensor, stats: bool = True,
                             block_m: int = 64, block_n: int = 32, block_k: int = 32):
    """(y (N, Cout, 2H, 2W) in x's dtype and layout, Σy (Cout,), Σy² (Cout,)) — the sums are fp32
    and empty when ``stats`` is False. Arguments already validated."""
    N, Cin, H, W = x.shape
    Cout = weight.shape[0]
    OH, OW = 2 * H, 2 * W
    memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not \
        x.is_contiguous() else torch.contiguous_format
    y = torch.empty((N, Cout, OH, OW), dtype=x.dtype, device=x.device, memory_format=memory_format)
    total = torch.zeros(Cout if stats else 0, dtype=torch.float32, device=x.device)
    total_sq = torch.zeros_like(total)
    if y.numel() == 0:
        return y, total, total_sq
    w = weight.reshape(Cout, Cin * 9).contiguous()
    grid = (triton.cdiv(N * OH * OW, block_m), triton.cdiv(Cout, block_n))
    _upsample_conv_fwd_kernel[grid](
        x, w, y, total, total_sq, N, Cin, H, W, Cout, OH, OW,
        (H - 1) / (OH - 1), (W - 1) / (OW - 1),
        *x.stride(), *y.stride(),
        # Triton 3.8's CPU interpreter computes bf16 tl.dot wrongly (numpy has no bf16), so there
        # the bf16 operands go through the fp32 dot; GPUs use the bf16 tensor-core path.
        STATS=stats, LOWP=x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and not _interpreted()),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y, total, total_sq
