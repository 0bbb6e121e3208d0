"""The adjoint of the bilinear ×2 up-sample (align_corners=True, as nn.UpsamplingBilinear2d) in
gather form: each input pixel sums the ≤4×4 up-sampled pixels that read it, so no atomics and a
fixed summation order (ATen's CUDA backward scatters with atomicAdd, which is neither).

Up-sampled row u (of OH = 2H) reads rows h0 = ⌊u(H−1)/(2H−1)⌋ and h1 = min(h0+1, H−1) with weights
1−f and f, f = frac(u(H−1)/(2H−1)), taken in integers so that h0 is exact. Row h is read only by
u ∈ [2h−1, 2h+2] (the source position u(H−1)/(2H−1) advances by just under ½ per row), so four
candidate rows (and four columns) per input pixel cover it; a candidate that does not read h gets
weight 0.
"""

from __future__ import annotations

import importlib.util

import torch

from madfast.ops._dtypes import acc_dtype

__all__ = ["torch_bilinear_adjoint", "triton_bilinear_adjoint", "bilinear_taps"]

TAPS = 4  # candidate up-sampled rows (columns) per input row (column)


def bilinear_taps(size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, weights), each (size, 4): the up-sampled rows 2h−1 … 2h+2 (clamped into range) that
    may read input row h, and the weight with which each reads it (0 where it does not)."""
    h = torch.arange(size, device=device).view(-1, 1)
    u = 2 * h - 1 + torch.arange(TAPS, device=device).view(1, -1)
    inside = (u >= 0) & (u < 2 * size)
    u = u.clamp(0, 2 * size - 1)
    den = 2 * size - 1
    num = u * (size - 1)
    h0 = num // den
    frac = (num - h0 * den).to(dtype) / den
    h1 = (h0 + 1).clamp_max(size - 1)
    weight = torch.where(h0 == h, 1 - frac, 0) + torch.where(h1 == h, frac, 0)
    return u, torch.where(inside, weight, 0)


def torch_bilinear_adjoint(grad_up: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, 2H, 2W) gradient of the up-sampled image → (N, C, H, W) gradient of its input, in
    grad_up's dtype (summed in fp32, fp64 for fp64); rows first, then columns (separable)."""
    acc = acc_dtype(grad_up.dtype)
    g = grad_up.to(acc)
    rows, w_rows = bilinear_taps(height, g.device, acc)
    cols, w_cols = bilinear_taps(width, g.device, acc)
    by_rows = sum(g.index_select(2, rows[:, t]) * w_rows[:, t].view(1, 1, -1, 1) for t in range(TAPS))
    out = sum(by_rows.index_select(3, cols[:, t]) * w_cols[:, t].view(1, 1, 1, -1) for t in range(TAPS))
    return out.to(grad_up.dtype)


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _taps(h, t, H, ACC: tl.constexpr):
        """Up-sampled row u = 2h−1+t, whether it exists, and the weight with which it reads row h."""
        u = 2 * h - 1 + t
        inside = (u >= 0) & (u < 2 * H)
        uc = tl.minimum(tl.maximum(u, 0), 2 * H - 1)
        den = 2 * H - 1
        num = uc * (H - 1)
        h0 = num // den
        frac = (num - h0 * den).to(ACC) / den
        h1 = tl.minimum(h0 + 1, H - 1)
        weight = tl.where(h0 == h, 1.0 - frac, 0.0) + tl.where(h1 == h, frac, 0.0)
        return uc, inside, tl.where(inside, weight, 0.0)

    @triton.jit
    def _bilinear_adjoint_kernel(
        g_ptr,  # (N, C, 2H, 2W), strides sg_*
        out_ptr,  # (N, C, H, W), strides so_*
        C, H, W, P,  # P = N·H·W input pixels
        sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w,
        ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        p_ok = p < P
        c_ok = c < C
        n = p // (H * W)
        h = (p // W) % H
        w = p % W
        base = g_ptr + n[:, None] * sg_n + c[None, :] * sg_c
        acc = tl.zeros((BLOCK_P, BLOCK_C), ACC)
        for i in tl.static_range(4):
            u, u_ok, wu = _taps(h, i, H, ACC)
            for j in tl.static_range(4):
                v, v_ok, wv = _taps(w, j, W, ACC)
                ok = (p_ok & u_ok & v_ok)[:, None] & c_ok[None, :]
                g = tl.load(base + (u * sg_h + v * sg_w)[:, None], mask=ok, other=0.0).to(ACC)
                acc += (wu * wv)[:, None] * g
        dst = out_ptr + n[:, None] * so_n + c[None, :] * so_c + (h * so_h + w * so_w)[:, None]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])

    def triton_bilinear_adjoint(grad_up: torch.Tensor, height: int, width: int,
                                out: torch.Tensor | None = None) -> torch.Tensor:
        """As torch_bilinear_adjoint, one Triton program per (pixel block, channel block); writes
        into ``out`` ((N, C, H, W), any strides) when given."""
        N, C = grad_up.shape[:2]
        if out is None:
            out = grad_up.new_empty((N, C, height, width))
        P = N * height * width
        if out.numel() == 0:
            return out
        block_c = min(64, triton.next_power_of_2(C))
        block_p = max(16, 2048 // block_c)
        grid = (triton.cdiv(P, block_p), triton.cdiv(C, block_c))
        _bilinear_adjoint_kernel[grid](
            grad_up, out, C, height, width, P, *grad_up.stride(), *out.stride(),
            ACC=tl.float64 if grad_up.dtype == torch.float64 else tl.float32, BLOCK_P=block_p, BLOCK_C=block_c)
        return out
