"""Triton kernels of conv3×3(bilinear-upsample×2(x)) as implicit GEMMs that never write the
upsampled tensor, forward and backward (align_corners=True weights; fp32 GEMMs in TF32 unless
torch.backends.cudnn.allow_tf32 is off — cuDNN's rule —, bf16/fp16 on tensor cores in their own
precision, fp32 accumulation; fp64 in fp64).

- Forward: a program owns an 8×8 tile of output pixels of one image; per chunk of input channels
  it interpolates the tile's 10×10 up-sampled halo once (four loads along the channels per pixel)
  and reads the nine taps from it as shifted views (tl.gather). The epilogue writes each tile's
  per-channel pivot (its first value), mean − pivot and Σ(y − mean)² in the accumulation dtype,
  merged in fp64 by bn_stats.reference.chan_combine in a fixed order into the batch mean and variance
  (no E[y²]−E[y]² cancellation, no atomics, no fp64 arithmetic in the kernel below fp64 inputs).
- Weight gradient: the reduction over pixels split over programs, each owning one tap and a run
  of channels, so the bilinear sources are computed per (pixel, tap); partials summed in order.
- Input gradient: per tile of input pixels, the conv-transpose GEMM over (tap, output channel) for
  its up-sampled region, then the bilinear adjoint as a second GEMM — no atomics.

The inner loops are sized against sm_90's issue rate without a GPU (benchmarks/kernel_sass.py,
docs/performance.md); "auto" takes these kernels only where `madfast check` verified them.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from madfast.ops._dtypes import acc_dtype
from madfast.ops._layout import kernel_memory_format
from madfast.ops._triton import TL_DTYPES, interpreted
from madfast.ops.bn_stats.reference import chan_combine

__all__ = ["GradFold", "triton_upsample_conv_fwd", "triton_upsample_conv_grad_weight",
           "triton_upsample_conv_grad_input"]


@triton.jit
def _source_coord(u, H, OH, scale, ACC: tl.constexpr):
    """The low-resolution coordinate u·(H−1)/(OH−1) of up-sampled row u: in fp64 from the integers
    (a host-side scale reaches the kernel as fp32, 1e-8 off), else with the fp32 scale."""
    if ACC == tl.float64:
        return (u * (H - 1)).to(tl.float64) / (OH - 1)
    else:
        return u.to(tl.float32) * scale


@triton.jit
def _tap_sources(oh, ow, m_ok, tap, H, W, OH, OW, scale_h, scale_w, sx_h, sx_w, ACC: tl.constexpr):
    """Where tap (kh, kw) = divmod(tap, 3) of output pixels (oh, ow) reads upsample×2(x): the four
    low-resolution offsets within the image (int32: the host checks that one image has < 2³¹
    elements) and their bilinear weights in ACC, 0 in the padding. Computed once per (pixel, tap)
    and reused for every channel of the tap."""
    u = oh + tap // 3 - 1  # row in the upsampled image
    v = ow + tap % 3 - 1
    ok = m_ok & (u >= 0) & (u < OH) & (v >= 0) & (v < OW)
    src_h = _source_coord(u, H, OH, scale_h, ACC)
    src_w = _source_coord(v, W, OW, scale_w, ACC)
    h0 = tl.minimum(tl.maximum(src_h.to(tl.int32), 0), H - 1)  # src ≥ 0 wherever ok
    w0 = tl.minimum(tl.maximum(src_w.to(tl.int32), 0), W - 1)
    h1 = tl.minimum(h0 + 1, H - 1)
    w1 = tl.minimum(w0 + 1, W - 1)
    lh = tl.where(ok, src_h - h0.to(ACC), 0.0)
    lw = src_w - w0.to(ACC)
    top = tl.where(ok, 1 - lh, 0.0)
    r0 = h0 * sx_h
    r1 = h1 * sx_h
    return (r0 + w0 * sx_w, r0 + w1 * sx_w, r1 + w0 * sx_w, r1 + w1 * sx_w,
            top * (1 - lw), top * lw, lh * (1 - lw), lh * lw, ok)


@triton.jit
def _gather_tap(x_img, o00, o01, o10, o11, w00, w01, w10, w11, ok, ci, Cin, sx_c, ACC: tl.constexpr):
    """[len(pixels), len(ci)] tile of the implicit-GEMM operand for one tap: channels ci of the
    up-sampled x, four loads along ci (contiguous in channels_last) weighted by _tap_sources;
    x_img points at each pixel's image."""
    mask = ok[:, None] & (ci < Cin)[None, :]
    c = ci[None, :] * sx_c
    a = w00[:, None] * tl.load(x_img[:, None] + (o00[:, None] + c), mask=mask, other=0.0).to(ACC)
    a += w01[:, None] * tl.load(x_img[:, None] + (o01[:, None] + c), mask=mask, other=0.0).to(ACC)
    a += w10[:, None] * tl.load(x_img[:, None] + (o10[:, None] + c), mask=mask, other=0.0).to(ACC)
    a += w11[:, None] * tl.load(x_img[:, None] + (o11[:, None] + c), mask=mask, other=0.0).to(ACC)
    return a


@triton.jit
def _upsample_conv_fwd_kernel(
    x_ptr,  # (N, Cin, H, W), strides sx_*
    w_ptr,  # (9·Cin, Cout) contiguous: rows (kh, kw, ci)
    y_ptr,  # (N, Cout, OH, OW), strides sy_*
    part_ptr,  # (3, tiles, Cout) ACC: each tile's first value (the pivot), mean − pivot and Σ(y − mean)²
    Cin, H, W, Cout, OH, OW, scale_h, scale_w, tiles_h, tiles_w,
    sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
    STATS: tl.constexpr, LOWP: tl.constexpr, FP32_DOT: tl.constexpr, ACC: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, HALO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """A program computes a TH×TW tile of output pixels of one image for BLOCK_N channels. Per chunk
    of BLOCK_K input channels it interpolates the tile's up-sampled halo — (TH+2)×(TW+2) pixels,
    four loads along the channels and the bilinear weights each — once, and reads the nine taps
    from it as shifted views (tl.gather within the program): the interpolation is done ~1.6× per
    output pixel and channel instead of 9× (one per tap)."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // (tiles_h * tiles_w)
    oh0 = ((pid // tiles_w) % tiles_h * TH).to(tl.int32)
    ow0 = (pid % tiles_w * TW).to(tl.int32)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    i = tl.arange(0, TH * TW)  # the tile's pixels, row-major
    oh = oh0 + i // TW
    ow = ow0 + i % TW
    m_ok = (oh < OH) & (ow < OW)
    # halo pixel p is up-sampled pixel (oh0 − 1 + p // (TW+2), ow0 − 1 + p % (TW+2)): the centre tap
    # (4) of _tap_sources at that pixel; 0 outside the image (the convolution's zero padding)
    p = tl.arange(0, HALO)
    hr = p // (TW + 2)
    o00, o01, o10, o11, w00, w01, w10, w11, ok = _tap_sources(oh0 - 1 + hr, ow0 - 1 + p % (TW + 2), hr < TH + 2, 4,
                                                              H, W, OH, OW, scale_h, scale_w, sx_h, sx_w, ACC)
    x_img = x_ptr + n * sx_n
    centre = (i // TW) * (TW + 2) + i % TW  # halo row of pixel i's tap (0, 0)
    acc = tl.zeros((TH * TW, BLOCK_N), ACC)
    for c0 in range(0, Cin, BLOCK_K):
        ci = c0 + tl.arange(0, BLOCK_K)
        halo = _gather_tap(x_img, o00, o01, o10, o11, w00, w01, w10, w11, ok, ci, Cin, sx_c, ACC)
        if LOWP:  # tensor cores in the input precision, fp32 accumulation
            halo = halo.to(w_ptr.dtype.element_ty)
        for tap in tl.static_range(9):
            rows = centre + (tap // 3) * (TW + 2) + tap % 3
            a = tl.gather(halo, tl.broadcast_to(rows[:, None], (TH * TW, BLOCK_K)), 0)
            b = tl.load(w_ptr + (tap * Cin + ci)[:, None] * Cout + co[None, :],
                        mask=(ci < Cin)[:, None] & co_ok[None, :], other=0.0)
            if LOWP:
                acc += tl.dot(a, b)
            else:
                acc += tl.dot(a, b.to(ACC), input_precision=FP32_DOT)
    out = acc.to(y_ptr.dtype.element_ty)
    y_off = n * sy_n + co[None, :] * sy_c + (oh * sy_h + ow * sy_w)[:, None]
    keep = m_ok[:, None] & co_ok[None, :]
    tl.store(y_ptr + y_off, out, mask=keep)
    if STATS:  # BatchNorm's batch statistics of the stored (rounded) values: this tile's partials,
        # taken about the tile's first pixel (always inside the image) so that they keep the variance
        # in ACC when |mean| ≫ std — y − pivot is then exact — with no fp64 arithmetic below fp64 inputs
        yv = out.to(ACC)
        pivot = tl.sum(tl.where((i == 0)[:, None], yv, 0.0), 0)
        d = tl.where(keep, yv - pivot[None, :], 0.0)
        rel_mean = tl.sum(d, 0) / tl.sum(m_ok.to(ACC), 0)
        e = tl.where(keep, d - rel_mean[None, :], 0.0)
        tiles = tl.num_programs(0).to(tl.int64)
        at = part_ptr + pid * Cout + co
        tl.store(at, pivot, mask=co_ok)
        tl.store(at + tiles * Cout, rel_mean, mask=co_ok)
        tl.store(at + 2 * tiles * Cout, tl.sum(e * e, 0), mask=co_ok)


def _check_image_size(x: torch.Tensor) -> None:
    """The kernels index within one image of x in 32 bits (_tap_sources); across images in 64."""
    if x.shape[0] and x[0].numel() >= 2**31:
        raise ValueError(f"upsample_conv (triton): one image of x has {x[0].numel()} elements; at most 2**31 - 1")


class GradFold(NamedTuple):
    """The forward's output y, its batch mean (Cout,), and the (Cout,) gradients g_Σ and g_Σ² to be
    folded into grad_y as the backward kernels read it: grad_y + g_Σ + 2(y − mean)·g_Σ² (the
    gradient of Σy and Σy² when mean is 0; of the batch mean and variance with g_Σ = g_mean/M and
    g_Σ² = g_var/M). An absent gradient (or mean) is None."""

    y: torch.Tensor
    grad_sum: torch.Tensor | None
    grad_sumsq: torch.Tensor | None
    mean: torch.Tensor | None = None

    def pointers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # an unused pointer still needs a tensor; the kernels never read it (FOLD_* False)
        return (self.y, self.y if self.grad_sum is None else self.grad_sum,
                self.y if self.grad_sumsq is None else self.grad_sumsq, self.y if self.mean is None else self.mean)

    def flags(self) -> dict[str, bool]:
        return {"FOLD_SUM": self.grad_sum is not None, "FOLD_SUMSQ": self.grad_sumsq is not None,
                "CENTRED": self.mean is not None}


@triton.jit
def _load_grad(gy_ptr, y_ptr, gsum_ptr, gsumsq_ptr, mean_ptr, g_off, y_off, co, mask,
               FOLD_SUM: tl.constexpr, FOLD_SUMSQ: tl.constexpr, CENTRED: tl.constexpr, ACC: tl.constexpr):
    """A tile of grad_y as the backward reads it, in ACC, 0 where not mask. With train-mode BatchNorm
    the gradients of its statistics are folded in here: grad_y + g_Σ[co] + 2·(y − mean[co])·g_Σ²[co]
    (see GradFold), so no temporary of y's size is written for them."""
    g = tl.load(gy_ptr + g_off, mask=mask, other=0.0).to(ACC)
    if FOLD_SUM:
        g += tl.load(gsum_ptr + co, mask=mask, other=0.0).to(ACC)
    if FOLD_SUMSQ:
        y = tl.load(y_ptr + y_off, mask=mask, other=0.0).to(ACC)
        if CENTRED:  # y − mean taken first: no cancellation when |mean| ≫ std
            y -= tl.load(mean_ptr + co, mask=mask, other=0.0).to(ACC)
        g += 2 * y * tl.load(gsumsq_ptr + co, mask=mask, other=0.0).to(ACC)
    return g


@triton.jit
def _upsample_conv_grad_weight_kernel(
    x_ptr,  # (N, Cin, H, W), strides sx_*
    gy_ptr,  # (N, Cout, OH, OW), strides sg_*
    y_ptr, gsum_ptr, gsumsq_ptr, mean_ptr,  # y (strides sy_*), (Cout,) g_Σ, g_Σ², mean: read only when folded
    gw_ptr,  # (splits, Cout, 9·Cin) fp32 contiguous, columns (kh, kw, ci)
    NB, Cin, H, W, Cout, OH, OW, scale_h, scale_w, M_SPLIT,
    sx_n, sx_c, sx_h, sx_w, sg_n, sg_c, sg_h, sg_w, sy_n, sy_c, sy_h, sy_w,
    FOLD_SUM: tl.constexpr, FOLD_SUMSQ: tl.constexpr, CENTRED: tl.constexpr,
    LOWP: tl.constexpr, FP32_DOT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_w[split, co, (tap, ci)] = Σ_{m in split} grad_y[m, co]·A[m, (tap, ci)], A gathered as in
    the forward: no upsampled tensor. A program owns one tap and BLOCK_K channels, so the bilinear
    sources are per pixel. Each split of the pixels has its own partial (summed in a fixed order)."""
    pid_n = tl.program_id(0).to(tl.int64)  # output channels
    pid_k = tl.program_id(1)  # (tap, channel chunk)
    split = tl.program_id(2).to(tl.int64)  # pixels [split·M_SPLIT, (split + 1)·M_SPLIT)
    chunks = tl.cdiv(Cin, BLOCK_K)
    tap = pid_k // chunks
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci = (pid_k - tap * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
    co_ok = co < Cout
    M = NB * OH * OW
    acc = tl.zeros((BLOCK_N, BLOCK_K), ACC)
    m_end = tl.minimum(split * M_SPLIT + M_SPLIT, M)
    for m0 in range(split * M_SPLIT, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < m_end
        n = m // (OH * OW)
        oh = ((m // OW) % OH).to(tl.int32)
        ow = (m % OW).to(tl.int32)
        x_img = x_ptr + n * sx_n
        o00, o01, o10, o11, w00, w01, w10, w11, ok = _tap_sources(oh, ow, m_ok, tap, H, W, OH, OW, scale_h,
                                                                  scale_w, sx_h, sx_w, ACC)
        a = _gather_tap(x_img, o00, o01, o10, o11, w00, w01, w10, w11, ok, ci, Cin, sx_c, ACC)
        g = _load_grad(gy_ptr, y_ptr, gsum_ptr, gsumsq_ptr, mean_ptr,
                       co[:, None] * sg_c + n[None, :] * sg_n + oh[None, :] * sg_h + ow[None, :] * sg_w,
                       co[:, None] * sy_c + n[None, :] * sy_n + oh[None, :] * sy_h + ow[None, :] * sy_w,
                       co[:, None], co_ok[:, None] & m_ok[None, :], FOLD_SUM, FOLD_SUMSQ, CENTRED, ACC)
        if LOWP:
            lowp = x_ptr.dtype.element_ty
            acc += tl.dot(g.to(lowp), a.to(lowp))
        else:
            acc += tl.dot(g, a, input_precision=FP32_DOT)
    tl.store(gw_ptr + (split * Cout + co[:, None]) * (9 * Cin) + tap * Cin + ci[None, :], acc,
             mask=co_ok[:, None] & (ci < Cin)[None, :])


def grad_weight_splits(M: int, tiles: int, block_m: int, programs: int = 1024) -> tuple[int, int]:
    """(splits, pixels per split) of the weight gradient's reduction over M = N·OH·OW pixels, for a
    grid of ``tiles`` (Cout, K) tiles: enough programs to fill a GPU (~``programs``; 132 SMs on an
    H100), at least 16 BLOCK_M steps each. One accumulator over all M pixels is both slow (36
    programs on 64×64→64 ch 56→112 px) and inexact in TF32 (on an H100: 3× cuDNN's error)."""
    splits = max(1, min(triton.cdiv(programs, tiles), M // (16 * block_m)))
    m_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    return triton.cdiv(M, m_split), m_split


def grad_weight_config(dtype: torch.dtype, max_shared: int, cin: int, cout: int) -> dict[str, int]:
    """Tiles of the weight-gradient kernel: a program owns BLOCK_N output × BLOCK_K input channels
    of one tap and steps over BLOCK_M pixels. Its loop gathers a (BLOCK_M, BLOCK_K) operand (reused
    by BLOCK_N channels) and folds a (BLOCK_N, BLOCK_M) grad_y tile (reused by BLOCK_K), so both
    channel tiles are as wide as the layer allows: at 128×128 the loop issues ~5× its bf16
    tensor-core time on sm_90, 15× at 128×32 (benchmarks/kernel_sass.py). Fits ``max_shared``."""
    if dtype == torch.float64:
        return {"block_m": 32, "block_n": 32, "block_k": 32, "num_warps": 4, "num_stages": 1}
    bn = min(128, max(32, triton.next_power_of_2(cout)))
    bk = min(128, max(16, triton.next_power_of_2(cin)))
    big = max_shared >= 160 * 1024 or dtype != torch.float32
    if not big:
        bk = min(bk, 64)
    return {"block_m": 32, "block_n": bn, "block_k": bk, "num_warps": 8 if bn * bk >= 8192 else 4,
            "num_stages": 2 if big else 1}


def triton_upsample_conv_grad_weight(x: torch.Tensor, grad_y: torch.Tensor, weight_shape: torch.Size,
                                     fold: GradFold | None = None) -> torch.Tensor:
    """The weight gradient of conv3×3(upsample×2(x)) given grad_y (and the BN sums' gradients in
    ``fold``), (Cout, Cin, 3, 3) in fp32 (fp64 for fp64). The pixels are split over programs
    (grad_weight_splits); the partials are summed in a fixed order (deterministic, no atomics)."""
    _check_image_size(x)
    N, Cin, H, W = x.shape
    Cout = weight_shape[0]
    OH, OW = 2 * H, 2 * W
    acc = acc_dtype(x.dtype)
    if x.numel() == 0 or Cout == 0:
        return torch.zeros(weight_shape, dtype=acc, device=x.device)
    cfg = grad_weight_config(x.dtype, max_shared_memory(x.device), Cin, Cout)
    block_m, block_n, block_k = cfg["block_m"], cfg["block_n"], cfg["block_k"]
    if interpreted():  # the interpreter's cost is per loop step, not per element: fewer, larger steps
        block_m = 128
    tiles_n, tiles_k = triton.cdiv(Cout, block_n), 9 * triton.cdiv(Cin, block_k)
    splits, m_split = grad_weight_splits(N * OH * OW, tiles_n * tiles_k, block_m)
    partials = torch.empty((splits, Cout, Cin * 9), dtype=acc, device=x.device)  # every entry written
    fold = fold or GradFold(grad_y, None, None)
    _upsample_conv_grad_weight_kernel[(tiles_n, tiles_k, splits)](
        x, grad_y, *fold.pointers(), partials, N, Cin, H, W, Cout, OH, OW, (H - 1) / (OH - 1), (W - 1) / (OW - 1),
        m_split, *x.stride(), *grad_y.stride(), *fold.y.stride(), **fold.flags(),
        **_precision_constexprs(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    gw = partials[0] if splits == 1 else partials.sum(0)
    return gw.reshape(Cout, 3, 3, Cin).permute(0, 3, 1, 2).contiguous()


TILE_H, TILE_W = 8, 4  # input pixels per grad-input program; their up-sampled region fits 20×12 ≤ 256
REGION = 256


@triton.jit
def _bilinear_weight(u, h, scale, H, OH, ACC: tl.constexpr):
    """Weight of low-resolution row h in up-sampled row u (align_corners=True), in ACC."""
    src = _source_coord(u, H, OH, scale, ACC)
    h0 = tl.minimum(src.to(tl.int32), H - 1)
    h1 = tl.minimum(h0 + 1, H - 1)
    frac = src - h0.to(ACC)
    return tl.where(h0 == h, 1.0 - frac, 0.0) + tl.where(h1 == h, frac, 0.0)


@triton.jit
def _upsample_conv_grad_input_kernel(
    gy_ptr,  # (N, Cout, OH, OW), strides sg_*
    y_ptr, gsum_ptr, gsumsq_ptr, mean_ptr,  # y (strides sy_*), (Cout,) g_Σ, g_Σ², mean: read only when folded
    w_ptr,  # (9·Cout, Cin) contiguous: rows (kh, kw, co), the reduction order of the loop
    gx_ptr,  # (N, Cin, H, W), strides sx_*
    Cin, H, W, Cout, OH, OW, scale_h, scale_w, tiles_h, tiles_w,
    sg_n, sg_c, sg_h, sg_w, sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w,
    FOLD_SUM: tl.constexpr, FOLD_SUMSQ: tl.constexpr, CENTRED: tl.constexpr, LOWP: tl.constexpr,
    FP32_DOT: tl.constexpr, ACC: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, REGION: tl.constexpr,
    REGION_W: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x = bilinear-adjoint(conv-transpose(grad_y)) one tile of input pixels at a time: the
    up-sampled gradient of the tile's region lives only in registers (two chained GEMMs)."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // (tiles_h * tiles_w)
    h_lo = (pid // tiles_w) % tiles_h * TILE_H
    w_lo = pid % tiles_w * TILE_W
    ci = tl.program_id(1).to(tl.int64) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < Cin
    # The up-sampled rows/columns that can touch input rows [h_lo, h_lo + TILE_H): 2h − 2 ≤ u < 2h + 4.
    p = tl.arange(0, REGION)
    u = tl.maximum(2 * h_lo - 2, 0) + p // REGION_W
    v = tl.maximum(2 * w_lo - 2, 0) + p % REGION_W
    p_ok = (u < OH) & (v < OW)
    # 1) the up-sampled gradient of the region: conv-transpose as a GEMM over (kh, kw, co), one flat
    #    loop; a step's grad_y rows/columns are per region pixel and tap, its loads along co
    chunks = tl.cdiv(Cout, BLOCK_K)
    g_up = tl.zeros((REGION, BLOCK_CI), ACC)
    for step in range(0, 9 * chunks):
        tap = step // chunks
        co = (step - tap * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        y_row = u + 1 - tap // 3
        y_col = v + 1 - tap % 3
        row_ok = p_ok & (y_row >= 0) & (y_row < OH) & (y_col >= 0) & (y_col < OW)
        ok = row_ok[:, None] & (co < Cout)[None, :]
        g = _load_grad(gy_ptr, y_ptr, gsum_ptr, gsumsq_ptr, mean_ptr,
                       (n * sg_n + y_row * sg_h + y_col * sg_w)[:, None] + co[None, :] * sg_c,
                       (n * sy_n + y_row * sy_h + y_col * sy_w)[:, None] + co[None, :] * sy_c,
                       co[None, :], ok, FOLD_SUM, FOLD_SUMSQ, CENTRED, ACC)
        wt = tl.load(w_ptr + (tap * Cout + co)[:, None] * Cin + ci[None, :],
                     mask=(co < Cout)[:, None] & ci_ok[None, :], other=0.0)
        if LOWP:  # tensor cores in the input precision (grad_y's own, the fold rounded to it), fp32 sums
            g_up += tl.dot(g.to(wt.dtype), wt)
        else:
            g_up += tl.dot(g, wt.to(ACC), input_precision=FP32_DOT)
    # 2) the bilinear adjoint: grad_x[i] = Σ_p weight(p → i)·g_up[p] (exact weights: "ieee")
    i = tl.arange(0, TILE_H * TILE_W)
    h = h_lo + i // TILE_W
    w = w_lo + i % TILE_W
    i_ok = (h < H) & (w < W)
    b = (_bilinear_weight(u[None, :], h[:, None], scale_h, H, OH, ACC)
         * _bilinear_weight(v[None, :], w[:, None], scale_w, W, OW, ACC))
    b = tl.where(i_ok[:, None] & p_ok[None, :], b, 0.0)
    gx = tl.dot(b, g_up, input_precision="ieee")
    tl.store(gx_ptr + n * sx_n + ci[None, :] * sx_c + h[:, None] * sx_h + w[:, None] * sx_w,
             gx.to(gx_ptr.dtype.element_ty), mask=i_ok[:, None] & ci_ok[None, :])


def grad_input_config(dtype: torch.dtype, max_shared: int, cin: int = 128) -> dict[str, int]:
    """Tiles and pipeline depth of the grad-input kernel within ``max_shared`` bytes of shared memory
    per block. Its loop loads and folds a (REGION, BLOCK_K) grad_y tile reused by BLOCK_CI input
    channels, so BLOCK_CI is as wide as the layer allows (128: ~1.5× the tensor-core time issued
    per step on sm_90, 32: ~5×; benchmarks/kernel_sass.py). Triton multi-buffers every load of the
    loop, so the stages must fit too (3 stages at BLOCK_K=32 need 364 KiB in fp32 with the BN fold);
    each choice is compiled for sm_90 and sm_86 in tests/test_triton_resources.py."""
    if dtype == torch.float64:
        return {"block_ci": 16, "block_k": 16, "num_stages": 1, "num_warps": 4}
    # the (REGION, BLOCK_CI) fp32 accumulator passes through shared memory for the adjoint's GEMM:
    # fp32 on sm_90 224 KiB at 128 channels (of 227: sm_90 only), 152 KiB at 64; sm_86 96 KiB at 64
    block_ci = min(128 if max_shared >= 200 * 1024 else 64, max(32, triton.next_power_of_2(cin)))
    return {"block_ci": block_ci, "block_k": 16, "num_stages": 2 if max_shared >= 160 * 1024 else 1,
            "num_warps": 8 if block_ci >= 64 else 4}


def max_shared_memory(device: torch.device) -> int:
    """Shared memory (bytes) a block of ``device``'s GPU may opt in to; unlimited in the CPU interpreter."""
    if device.type != "cuda" or interpreted():
        return 1 << 30
    props = torch.cuda.get_device_properties(device)  # the optin value is what Triton's driver reports
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)  # absent on ROCm


def triton_upsample_conv_grad_input(grad_y: torch.Tensor, weight: torch.Tensor, x: torch.Tensor,
                                    fold: GradFold | None = None) -> torch.Tensor:
    """The input gradient of conv3×3(upsample×2(x)) given grad_y (and the BN sums' gradients in
    ``fold``), in x's dtype and layout; x's values are not read."""
    cfg = grad_input_config(grad_y.dtype, max_shared_memory(grad_y.device), x.shape[1])
    if interpreted():  # the interpreter's cost is per loop step, not per element: fewer, larger steps
        cfg["block_k"] = 64
    block_ci = cfg["block_ci"]
    N, Cin, H, W = x.shape
    Cout = weight.shape[0]
    gx = torch.empty_like(x)
    if gx.numel() == 0:
        return gx
    if Cout == 0:
        return gx.zero_()
    w = weight.permute(2, 3, 0, 1).reshape(9 * Cout, Cin).contiguous()  # rows (kh, kw, co) as in the loop
    tiles_h, tiles_w = triton.cdiv(H, TILE_H), triton.cdiv(W, TILE_W)
    grid = (N * tiles_h * tiles_w, triton.cdiv(Cin, block_ci))
    fold = fold or GradFold(grad_y, None, None)
    _upsample_conv_grad_input_kernel[grid](
        grad_y, *fold.pointers(), w, gx, Cin, H, W, Cout, 2 * H, 2 * W, (H - 1) / (2 * H - 1), (W - 1) / (2 * W - 1),
        tiles_h, tiles_w, *grad_y.stride(), *fold.y.stride(), *gx.stride(), **fold.flags(),
        **_precision_constexprs(grad_y.dtype), TILE_H=TILE_H, TILE_W=TILE_W, REGION=REGION,
        REGION_W=2 * TILE_W + 4, BLOCK_CI=block_ci, BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return gx


def _precision_constexprs(dtype: torch.dtype) -> dict:
    """The GEMM kernels' LOWP, FP32_DOT and ACC for ``dtype`` inputs. LOWP: tl.dot in the input
    precision (tensor cores) for fp16/bf16, except bf16 in the CPU interpreter, whose bf16 tl.dot is
    wrong in Triton 3.8 (numpy has no bf16). FP32_DOT: TF32 for fp32 as cuDNN's convolutions, unless
    torch.backends.cudnn.allow_tf32 is off; "ieee" otherwise and in the interpreter (numpy has no
    TF32). ACC: fp64 for fp64 inputs, fp32 otherwise."""
    lowp = dtype == torch.float16 or (dtype == torch.bfloat16 and not interpreted())
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not interpreted()
    return {"LOWP": lowp, "FP32_DOT": "tf32" if tf32 else "ieee", "ACC": TL_DTYPES[acc_dtype(dtype)]}


TH, TW = 8, 8  # output pixels per forward program (one image); their up-sampled halo is 10×10 ≤ HALO
HALO = 128
_FWD_CONFIGS = {  # (BLOCK_N, BLOCK_K, num_warps, num_stages) per operand precision
    # bf16/fp16: ≤ 16 KiB of shared memory; the loop issues 1.5, 1.5, 1.8, 2.7× its tensor-core time
    "lowp": ((128, 32, 4, 2), (128, 16, 4, 3), (128, 32, 8, 2), (64, 32, 4, 2)),
    # fp32: pipelining puts the four fp32 gathers in shared memory (180 KiB at 2 stages, over sm_86's
    # 99 KiB: the autotuner skips what does not fit), so the first config runs unpipelined
    "fp32": ((128, 16, 4, 1), (128, 16, 4, 2), (128, 16, 8, 2)),
    "fp64": ((32, 16, 4, 1),),  # a correctness dtype: one small tile
}


def _precision(dtype: torch.dtype) -> str:
    return "fp64" if dtype == torch.float64 else "fp32" if dtype == torch.float32 else "lowp"


def forward_configs(dtype: torch.dtype) -> list[triton.Config]:
    """What the forward is autotuned over on a GPU for ``dtype`` inputs, per shape. The first is
    what the CPU interpreter and deterministic mode run. Each fits sm_86's and sm_90's shared
    memory (tests/test_triton_resources.py); wide BLOCK_N because the interpolated halo is reused
    by BLOCK_N output channels (benchmarks/kernel_sass.py)."""
    return _forward_tuner(_precision(dtype)).configs


@functools.cache
def _forward_tuner(precision: str):
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bn, bk, w, s in _FWD_CONFIGS[precision]]
    return triton.autotune(configs, key=["Cin", "H", "W", "Cout", "tiles_h", "tiles_w"])(_upsample_conv_fwd_kernel)


def _launch_tuned(tuner, grid, *args, **kwargs) -> None:
    """Launch the autotuner ``tuner`` on a GPU; its first config in the interpreter (nothing to time)
    and under torch.use_deterministic_algorithms (one config, so one rounding in every process)."""
    if interpreted() or torch.are_deterministic_algorithms_enabled():
        cfg = tuner.configs[0]
        tuner.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        tuner[grid](*args, **kwargs)


def triton_upsample_conv_fwd(x: torch.Tensor, weight: torch.Tensor, stats: bool = True):
    """(y (N, Cout, 2H, 2W) in x's dtype and layout, batch mean (Cout,), biased batch variance
    (Cout,)) — the moments are fp32 (fp64 for fp64) and empty when ``stats`` is False. Arguments
    already validated."""
    _check_image_size(x)
    N, Cin, H, W = x.shape
    Cout = weight.shape[0]
    OH, OW = 2 * H, 2 * W
    y = torch.empty((N, Cout, OH, OW), dtype=x.dtype, device=x.device, memory_format=kernel_memory_format(x))
    tiles_h, tiles_w = triton.cdiv(OH, TH), triton.cdiv(OW, TW)
    tiles = N * tiles_h * tiles_w
    acc = acc_dtype(x.dtype)
    part = torch.empty((3, tiles if stats else 0, Cout), dtype=acc, device=x.device)  # every element written
    if y.numel() == 0:
        return y, y.new_zeros(Cout if stats else 0, dtype=acc), y.new_zeros(Cout if stats else 0, dtype=acc)
    w = weight.permute(2, 3, 1, 0).reshape(9 * Cin, Cout).contiguous()  # rows (kh, kw, ci) as in the loop
    _launch_tuned(_forward_tuner(_precision(x.dtype)), lambda meta: (tiles, triton.cdiv(Cout, meta["BLOCK_N"])),
                  x, w, y, part, Cin, H, W, Cout, OH, OW, (H - 1) / (OH - 1), (W - 1) / (OW - 1),
                  tiles_h, tiles_w, *x.stride(), *y.stride(), STATS=stats, **_precision_constexprs(x.dtype),
                  TH=TH, TW=TW, HALO=HALO)
    if not stats:
        return y, y.new_empty(0, dtype=acc), y.new_empty(0, dtype=acc)
    rows = (OH - torch.arange(tiles_h, device=x.device) * TH).clamp_max(TH)  # pixels per tile (edges: fewer)
    cols = (OW - torch.arange(tiles_w, device=x.device) * TW).clamp_max(TW)
    counts = (rows[:, None] * cols[None, :]).flatten().repeat(N)
    # tiles combined in fp64 (pivot + mean − pivot is exact there): (tiles, Cout) values, not per pixel
    pivot, rel_mean, m2 = part.double()
    mean, var = chan_combine(counts, pivot + rel_mean, m2)
    return y, mean.to(acc), var.to(acc)
