"""Triton kernels of the logit losses (the C++/CUDA ops' twins, csrc/logit_losses.h):

- forward: one read of s and t per row (online softmax for KL) → per-row statistics, and a second
  one-program stage that sums the rows in a fixed order into the reduced, bounded loss;
- backward: both gradients recomputed from the statistics and the device-side grad_output.

KL: row_i = τ²·KL(softmax(t_i/τ) ‖ softmax(s_i/τ)); stats (5, B): max and log-sum-exp offset of
s/τ and t/τ, and KL_i. L1: row_i = Σ_j |s_ij − t_ij|. Loss = sign·min(D, bound), D = factor·Σ row_i.
Accumulation is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from madfast.ops._dtypes import acc_dtype
from madfast.ops._triton import TL_DTYPES
from madfast.ops.kl.reference import N_STATS, loss_outputs

__all__ = ["triton_kl_div_fwd", "triton_kl_div_bwd", "triton_l1_fwd", "triton_l1_bwd"]

MAX_BLOCK_C = 4096
REDUCE_BLOCK = 1024


def launch_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_C, ROWS, num_warps): a tile of about 4K elements, a whole row when it fits."""
    block_c = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK_C)
    rows = max(1, min(64, 4096 // block_c, triton.next_power_of_2(max(n_rows, 1))))
    return block_c, rows, 4 if block_c * rows <= 2048 else 8


def reduction_factor(reduction: str, B: int, C: int) -> float:
    """The reduction's factor on Σ rows; NaN for a mean over nothing (as torch's mean of an empty tensor)."""
    count = {"sum": 1, "none": 1, "batchmean": B, "mean": B * C}[reduction]
    return 1.0 / count if count else float("nan")


@triton.jit
def _kl_fwd_kernel(
    s_ptr, t_ptr,  # (B, C) logits, row stride s_stride / t_stride, unit column stride
    stats_ptr,  # (5, B) fp32/fp64
    rows_out_ptr,  # (B,) τ²·KL_i in the logits' dtype ("none" only)
    B, C, s_stride, t_stride, inv_tau, tau_sq,
    ACC: tl.constexpr, WRITE_ROWS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    # Rows past B re-read row B−1 (their results are not stored), so no lane sees −inf − −inf.
    read_rows = tl.minimum(rows, B - 1)
    cols = tl.arange(0, BLOCK_C)
    s_row = s_ptr + read_rows[:, None] * s_stride
    t_row = t_ptr + read_rows[:, None] * t_stride
    # Online over tiles: maxima m, sums S of e^(x − m) and W = Σ e^(xt − m_t)·((xt − m_t) − (xs − m_s)),
    # all rescaled when a maximum moves (one tile when the row fits).
    m_s = tl.full((ROWS,), float("-inf"), ACC)
    m_t = tl.full((ROWS,), float("-inf"), ACC)
    sum_s = tl.zeros((ROWS,), ACC)
    sum_t = tl.zeros((ROWS,), ACC)
    w = tl.zeros((ROWS,), ACC)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = c[None, :] < C
        xs = tl.load(s_row + c[None, :], mask=mask, other=float("-inf")).to(ACC) * inv_tau
        xt = tl.load(t_row + c[None, :], mask=mask, other=float("-inf")).to(ACC) * inv_tau
        new_m_s = tl.maximum(m_s, tl.max(xs, 1))  # finite from the first tile on
        new_m_t = tl.maximum(m_t, tl.max(xt, 1))
        scale_s = tl.exp(m_s - new_m_s)
        scale_t = tl.exp(m_t - new_m_t)
        shift = tl.where(m_t == float("-inf"), 0.0, (m_t - new_m_t) - (m_s - new_m_s))
        et = tl.exp(xt - new_m_t[:, None])
        d = tl.where(mask, xt - new_m_t[:, None], 0.0) - tl.where(mask, xs - new_m_s[:, None], 0.0)
        w = scale_t * (w + sum_t * shift) + tl.sum(et * d, 1)
        sum_s = sum_s * scale_s + tl.sum(tl.exp(xs - new_m_s[:, None]), 1)
        sum_t = sum_t * scale_t + tl.sum(et, 1)
        m_s = new_m_s
        m_t = new_m_t
    log_s = tl.log(sum_s)
    log_t = tl.log(sum_t)
    kl = w / sum_t - log_t + log_s
    tl.store(stats_ptr + rows, m_s, mask=row_ok)
    tl.store(stats_ptr + B + rows, log_s, mask=row_ok)
    tl.store(stats_ptr + 2 * B + rows, m_t, mask=row_ok)
    tl.store(stats_ptr + 3 * B + rows, log_t, mask=row_ok)
    tl.store(stats_ptr + 4 * B + rows, kl, mask=row_ok)
    if WRITE_ROWS:
        tl.store(rows_out_ptr + rows, (kl * tau_sq).to(rows_out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _l1_fwd_kernel(
    s_ptr, t_ptr,  # (B, C) logits, row stride s_stride / t_stride, unit column stride
    rows_acc_ptr,  # (B,) Σ|s − t| fp32/fp64
    rows_out_ptr,  # (B,) the same in the logits' dtype ("none" only)
    B, C, s_stride, t_stride,
    ACC: tl.constexpr, WRITE_ROWS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    cols = tl.arange(0, BLOCK_C)
    total = tl.zeros((ROWS,), ACC)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = row_ok[:, None] & (c[None, :] < C)
        d = (tl.load(s_ptr + rows[:, None] * s_stride + c[None, :], mask=mask, other=0.0).to(ACC)
             - tl.load(t_ptr + rows[:, None] * t_stride + c[None, :], mask=mask, other=0.0).to(ACC))
        total += tl.sum(tl.abs(d), 1)
    tl.store(rows_acc_ptr + rows, total, mask=row_ok)
    if WRITE_ROWS:
        tl.store(rows_out_ptr + rows, total.to(rows_out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _reduce_kernel(
    rows_ptr,  # (B,) fp32/fp64 row values
    total_ptr,  # () D = scale·Σ rows, fp32/fp64
    loss_ptr,  # () sign·min(D, bound) in the logits' dtype
    B, scale, sign, bound_hi, bound_lo,  # bound = hi + lo: Triton passes float scalars as fp32
    ACC: tl.constexpr, HAS_BOUND: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program, a fixed order: deterministic, no atomics.
    acc = tl.zeros((BLOCK,), ACC)
    for start in range(0, B, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.load(rows_ptr + i, mask=i < B, other=0.0)
    d = tl.sum(acc, 0) * scale
    tl.store(total_ptr, d)
    if HAS_BOUND:
        # bound added up in ACC; a NaN D (a mean over no rows) stays NaN, as with torch.clamp
        d = tl.minimum(d, tl.zeros((), ACC) + bound_hi + bound_lo, propagate_nan=tl.PropagateNan.ALL)
    tl.store(loss_ptr, (d * sign).to(loss_ptr.dtype.element_ty))


@triton.jit
def _row_grad(grad_ptr, rows, row_ok, g_stride, total_ptr, factor, sign, bound, ACC: tl.constexpr,
              REDUCED: tl.constexpr, HAS_BOUND: tl.constexpr):
    """grad_output times the chain rule of the reduction and the bound, per row (all on the device)."""
    g = tl.load(grad_ptr + rows * g_stride, mask=row_ok, other=0.0).to(ACC)
    if REDUCED:
        g = g * factor * sign
        if HAS_BOUND:
            g = tl.where(tl.load(total_ptr) > bound, 0.0, g)  # clamp's rule: gradient up to D == bound
    return g


@triton.jit
def _kl_bwd_kernel(
    s_ptr, t_ptr,  # (B, C) logits, row stride s_stride / t_stride, unit column stride
    stats_ptr,  # (5, B) from the forward
    grad_ptr, total_ptr,  # grad_output (element b·g_stride), D (0-d)
    gs_ptr, gt_ptr,  # (B, C) contiguous, in the logits' dtype
    B, C, s_stride, t_stride, g_stride, inv_tau, tau, factor, sign, bound,
    ACC: tl.constexpr, REDUCED: tl.constexpr, HAS_BOUND: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    m_s = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
    log_s = tl.load(stats_ptr + B + rows, mask=row_ok, other=0.0)
    m_t = tl.load(stats_ptr + 2 * B + rows, mask=row_ok, other=0.0)
    log_t = tl.load(stats_ptr + 3 * B + rows, mask=row_ok, other=0.0)
    kl = tl.load(stats_ptr + 4 * B + rows, mask=row_ok, other=0.0)
    g = _row_grad(grad_ptr, rows, row_ok, g_stride, total_ptr, factor, sign, bound, ACC, REDUCED, HAS_BOUND) * tau
    cols = tl.arange(0, BLOCK_C)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = row_ok[:, None] & (c[None, :] < C)
        xs = tl.load(s_ptr + rows[:, None] * s_stride + c[None, :], mask=mask, other=0.0).to(ACC) * inv_tau
        xt = tl.load(t_ptr + rows[:, None] * t_stride + c[None, :], mask=mask, other=0.0).to(ACC) * inv_tau
        lps = (xs - m_s[:, None]) - log_s[:, None]
        lpt = (xt - m_t[:, None]) - log_t[:, None]
        pt = tl.exp(lpt)
        if GRAD_S:
            gs = g[:, None] * (tl.exp(lps) - pt)
            tl.store(gs_ptr + rows[:, None] * C + c[None, :], gs.to(gs_ptr.dtype.element_ty), mask=mask)
        if GRAD_T:
            gt = g[:, None] * pt * ((lpt - lps) - kl[:, None])
            tl.store(gt_ptr + rows[:, None] * C + c[None, :], gt.to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l1_bwd_kernel(
    s_ptr, t_ptr, grad_ptr, total_ptr, gs_ptr, gt_ptr,  # as _kl_bwd_kernel
    B, C, s_stride, t_stride, g_stride, factor, sign, bound,
    ACC: tl.constexpr, REDUCED: tl.constexpr, HAS_BOUND: tl.constexpr, GRAD_S: tl.constexpr,
    GRAD_T: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    g = _row_grad(grad_ptr, rows, row_ok, g_stride, total_ptr, factor, sign, bound, ACC, REDUCED, HAS_BOUND)
    cols = tl.arange(0, BLOCK_C)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        mask = row_ok[:, None] & (c[None, :] < C)
        d = (tl.load(s_ptr + rows[:, None] * s_stride + c[None, :], mask=mask, other=0.0).to(ACC)
             - tl.load(t_ptr + rows[:, None] * t_stride + c[None, :], mask=mask, other=0.0).to(ACC))
        v = g[:, None] * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        if GRAD_S:
            tl.store(gs_ptr + rows[:, None] * C + c[None, :], v.to(gs_ptr.dtype.element_ty), mask=mask)
        if GRAD_T:
            tl.store(gt_ptr + rows[:, None] * C + c[None, :], (-v).to(gt_ptr.dtype.element_ty), mask=mask)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _finish(rows_acc, loss, total, reduction, scale, sign, bound):
    """The second stage of a reduced loss (nothing for "none": the rows were written already)."""
    if reduction != "none":
        hi = 0.0 if bound is None else struct.unpack("f", struct.pack("f", bound))[0]  # bound rounded to fp32
        lo = 0.0 if bound is None else float(bound) - hi  # exact in fp64; rounded to fp32 it keeps ~48 bits
        _reduce_kernel[(1,)](rows_acc, total, loss, rows_acc.numel(), scale, sign, hi, lo,
                             ACC=TL_DTYPES[rows_acc.dtype],
                             HAS_BOUND=bound is not None, BLOCK=REDUCE_BLOCK, num_warps=4)


def triton_kl_div_fwd(s, t, temperature: float, reduction: str, sign: float, bound: float | None):
    """(loss, stats (5, B), total); arguments already validated."""
    s, t = _rows_contiguous(s), _rows_contiguous(t)
    (B, C), acc = s.shape, acc_dtype(s.dtype)
    loss, total = loss_outputs(s, reduction)
    stats = s.new_empty((N_STATS, B), dtype=acc)
    if B > 0:
        block_c, rows, warps = launch_config(B, C)
        _kl_fwd_kernel[(triton.cdiv(B, rows),)](
            s, t, stats, loss, B, C, s.stride(0), t.stride(0), 1.0 / temperature, float(temperature) ** 2,
            ACC=TL_DTYPES[acc], WRITE_ROWS=reduction == "none", ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    _finish(stats[4], loss, total, reduction, temperature**2 * reduction_factor(reduction, B, C), sign, bound)
    return loss, stats, total


def triton_l1_fwd(s, t, reduction: str, sign: float, bound: float | None):
    """(loss, total); arguments already validated."""
    s, t = _rows_contiguous(s), _rows_contiguous(t)
    (B, C), acc = s.shape, acc_dtype(s.dtype)
    loss, total = loss_outputs(s, reduction)
    rows_acc = s.new_empty(B, dtype=acc)
    if B > 0:
        block_c, rows, warps = launch_config(B, C)
        _l1_fwd_kernel[(triton.cdiv(B, rows),)](
            s, t, rows_acc, loss, B, C, s.stride(0), t.stride(0),
            ACC=TL_DTYPES[acc], WRITE_ROWS=reduction == "none", ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    _finish(rows_acc, loss, total, reduction, reduction_factor(reduction, B, C), sign, bound)
    return loss, total


def _launch_bwd(kernel, s, t, stats: tuple, grad, total, scalars: tuple, reduction: str, sign: float,
                bound: float | None, grad_s: bool, grad_t: bool):
    """Runs a backward kernel, ``kernel(s, t, *stats, grad, total, gs, gt, B, C, strides, *scalars,
    factor, sign, bound)``, over the rows; returns (∂loss/∂s or empty, ∂loss/∂t or empty) in the
    logits' dtype."""
    s, t = _rows_contiguous(s), _rows_contiguous(t)
    (B, C), acc = s.shape, acc_dtype(s.dtype)
    gs = s.new_empty((B, C) if grad_s else (0,))
    gt = s.new_empty((B, C) if grad_t else (0,))
    if B == 0 or not (grad_s or grad_t):
        return gs, gt
    grad = grad.to(s.dtype)  # may change the strides: read them after
    g_stride = 0 if reduction != "none" else grad.stride(0)
    block_c, rows, warps = launch_config(B, C)
    kernel[(triton.cdiv(B, rows),)](
        s, t, *stats, grad, total, gs, gt, B, C, s.stride(0), t.stride(0), g_stride, *scalars,
        reduction_factor(reduction, B, C), sign, 0.0 if bound is None else float(bound),
        ACC=TL_DTYPES[acc], REDUCED=reduction != "none", HAS_BOUND=bound is not None, GRAD_S=grad_s,
        GRAD_T=grad_t, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return gs, gt


def triton_kl_div_bwd(grad, s, t, stats, total, temperature: float, reduction: str, sign: float,
                      bound: float | None, grad_s: bool, grad_t: bool):
    """(∂loss/∂s or empty, ∂loss/∂t or empty) in the logits' dtype."""
    return _launch_bwd(_kl_bwd_kernel, s, t, (stats,), grad, total, (1.0 / temperature, float(temperature)),
                       reduction, sign, bound, grad_s, grad_t)


def triton_l1_bwd(grad, s, t, total, reduction: str, sign: float, bound: float | None, grad_s: bool, grad_t: bool):
    """(∂loss/∂s or empty, ∂loss/∂t or empty) in the logits' dtype."""
    return _launch_bwd(_l1_bwd_kernel, s, t, (), grad, total, (), reduction, sign, bound, grad_s, grad_t)
