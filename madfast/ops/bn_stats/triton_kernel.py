"""Triton kernels of the per-channel moments of x (N, C, H, W) and their backward.

Moments in fp32 (fp64 only for fp64 inputs) from chunk partials: each chunk's count, mean and M2
(two passes over the chunk in registers, Σd² − (Σd)²/n correcting the chunk mean's rounding),
merged with Chan's formula in a fixed order — exact when |mean| ≫ std, deterministic.
NCHW: a program per channel reads contiguous H×W runs (no index division per element).
channels_last: a program per tile of channels reads positions × channels tiles coalesced along C.
When those programs would not fill the GPU (a 64-channel stem layer: 64 programs for millions of
values), each channel's runs / positions are split over several programs that write partials, and
a second kernel merges them in split order (still deterministic).
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

__all__ = ["triton_channel_moments", "triton_channel_moments_backward", "moments_view", "moment_splits"]

BLOCK = 1024  # NCHW: elements per chunk
BLOCK_P, BLOCK_C = 64, 32  # channels_last: positions × channels per tile
MAX_SPLITS, MIN_STEPS = 64, 8  # partials per channel; chunks / tiles each split reads at least


def moment_splits(programs: int, steps: int, device: torch.device) -> int:
    """Programs per channel (group): enough for ~4 per multiprocessor, each with ≥ MIN_STEPS chunks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = triton.cdiv(4 * sms, max(programs, 1))
    return max(1, min(MAX_SPLITS, want, steps // MIN_STEPS))


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
def _chunk_moments(x, mask, k):
    """(count, mean, M2) along axis 0 of a chunk's ``k`` masked values: its mean, then the deviations
    from it (Σd² − (Σd)²/k corrects the mean's rounding)."""
    m = tl.sum(x, 0) / k
    d = tl.where(mask, x - m, 0.0)
    s1 = tl.sum(d, 0)
    return k, m + s1 / k, tl.maximum(tl.sum(d * d, 0) - s1 * s1 / k, 0.0)


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
            n_c, mean_c, m2_c = _chunk_moments(x, mask, tl.minimum(HW - start, BLOCK).to(ACC))
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, n_c, mean_c, m2_c)
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
        n_c, mean_c, m2_c = _chunk_moments(x, mask, tl.minimum(M - start, BLOCK_P).to(ACC))
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, n_c, mean_c, m2_c)
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(var_ptr + c, m2 / cnt, mask=c_ok)


@triton.jit
def _partials_nchw_kernel(
    x_ptr, part_ptr,  # part: (3, C·S) count, mean, M2 of channel c's split s at c·S + s
    N, HW, s_n, s_c, CHUNKS_N, PER, S,  # CHUNKS_N: chunks per (n, c) run; PER: chunks per split
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    cnt = tl.zeros((), ACC)
    mean = tl.zeros((), ACC)
    m2 = tl.zeros((), ACC)
    k0 = split * PER
    k1 = tl.minimum(k0 + PER, N * CHUNKS_N)
    for k in range(k0, k1):
        n = k // CHUNKS_N  # once per chunk of BLOCK values
        start = (k - n * CHUNKS_N) * BLOCK
        i = start + tl.arange(0, BLOCK)
        mask = i < HW
        x = tl.load(x_ptr + n * s_n + c * s_c + i, mask=mask, other=0.0).to(ACC)
        n_c, mean_c, m2_c = _chunk_moments(x, mask, tl.minimum(HW - start, BLOCK).to(ACC))
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, n_c, mean_c, m2_c)
    total = tl.num_programs(0).to(tl.int64) * S
    at = c * S + split
    tl.store(part_ptr + at, cnt)
    tl.store(part_ptr + total + at, mean)
    tl.store(part_ptr + 2 * total + at, m2)


@triton.jit
def _partials_cl_kernel(
    x_ptr, part_ptr,  # part: (3, C·S) as above
    M, C, PER, S,  # PER: positions per split (a multiple of BLOCK_P)
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1).to(tl.int64)
    c_ok = c < C
    cnt = tl.zeros((BLOCK_C,), ACC)
    mean = tl.zeros((BLOCK_C,), ACC)
    m2 = tl.zeros((BLOCK_C,), ACC)
    p0 = split * PER
    p1 = tl.minimum(p0 + PER, M)
    for start in range(p0, p1, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P).to(tl.int64)
        mask = (p[:, None] < p1) & c_ok[None, :]
        x = tl.load(x_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
        n_c, mean_c, m2_c = _chunk_moments(x, mask, tl.minimum(p1 - start, BLOCK_P).to(ACC))
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, n_c, mean_c, m2_c)
    total = C * S
    at = c * S + split
    tl.store(part_ptr + at, cnt, mask=c_ok)
    tl.store(part_ptr + total + at, mean, mask=c_ok)
    tl.store(part_ptr + 2 * total + at, m2, mask=c_ok)


@triton.jit
def _merge_partials_kernel(
    part_ptr, mean_ptr, var_ptr,  # part: (3, C·S); mean, var: (C,)
    C, S,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    total = C * S
    cnt = tl.load(part_ptr + c * S, mask=c_ok, other=0.0)
    mean = tl.load(part_ptr + total + c * S, mask=c_ok, other=0.0)
    m2 = tl.load(part_ptr + 2 * total + c * S, mask=c_ok, other=0.0)
    for s in range(1, S):  # split order: deterministic
        n_b = tl.load(part_ptr + c * S + s, mask=c_ok, other=0.0)
        mean_b = tl.load(part_ptr + total + c * S + s, mask=c_ok, other=0.0)
        m2_b = tl.load(part_ptr + 2 * total + c * S + s, mask=c_ok, other=0.0)
        n, new_mean, new_m2 = _chan_merge(cnt, mean, m2, n_b, mean_b, m2_b)
        keep = n_b == 0  # an empty split (none when PER divides evenly, but never divide by 0)
        cnt, mean, m2 = tl.where(keep, cnt, n), tl.where(keep, mean, new_mean), tl.where(keep, m2, new_m2)
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
    M, HW = N * H * W, H * W
    if channels_last:
        groups, tiles = triton.cdiv(C, BLOCK_C), triton.cdiv(M, BLOCK_P)
        splits = moment_splits(groups, tiles, x.device)
        if splits == 1:
            _moments_cl_kernel[(groups,)](x, mean, var, M, C, ACC=TL_DTYPES[acc], BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
                                          num_warps=4)
            return mean, var
        part = torch.empty(3, C * splits, dtype=acc, device=x.device)
        per = triton.cdiv(tiles, splits) * BLOCK_P
        _partials_cl_kernel[(groups, splits)](x, part, M, C, per, splits, ACC=TL_DTYPES[acc], BLOCK_P=BLOCK_P,
                                              BLOCK_C=BLOCK_C, num_warps=4)
    else:
        chunks_n = triton.cdiv(HW, BLOCK)
        splits = moment_splits(C, N * chunks_n, x.device)
        if splits == 1:
            _moments_nchw_kernel[(C,)](x, mean, var, N, HW, s_n, s_c, ACC=TL_DTYPES[acc], BLOCK=BLOCK, num_warps=8)
            return mean, var
        part = torch.empty(3, C * splits, dtype=acc, device=x.device)
        per = triton.cdiv(N * chunks_n, splits)
        _partials_nchw_kernel[(C, splits)](x, part, N, HW, s_n, s_c, chunks_n, per, splits, ACC=TL_DTYPES[acc],
                                           BLOCK=BLOCK, num_warps=8)
    _merge_partials_kernel[(triton.cdiv(C, BLOCK_C),)](part, mean, var, C, splits, ACC=TL_DTYPES[acc],
                                                       BLOCK_C=BLOCK_C, num_warps=1)
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
