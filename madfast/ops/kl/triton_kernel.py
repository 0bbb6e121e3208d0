"""Triton kernels of the per-row logit losses, each computing the loss and the gradients of
both inputs in the same pass over a row (online softmax for KL):

- KL: row_i = τ²·KL(softmax(t_i/τ) ‖ softmax(s_i/τ)),
      ∂row_i/∂s = τ·(p_s − p_t),  ∂row_i/∂t = τ·p_t·(log p_t − log p_s − KL_i)
- L1: row_i = Σ_j |s_ij − t_ij|,   ∂row_i/∂s = sign(s − t) = −∂row_i/∂t

A program owns ROWS rows; a row whose C fits one BLOCK_C tile is read once, a longer one
twice (statistics, then gradients). Accumulation is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from madfast.ops._dtypes import acc_dtype
from madfast.ops._triton import TL_DTYPES

__all__ = ["triton_kl_div_fwd", "triton_l1_fwd", "launch_config"]

MAX_BLOCK_C = 4096


def launch_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_C, ROWS, num_warps): a tile of about 4K elements, a whole row when it fits."""
    block_c = min(triton.next_power_of_2(max(n_cols, 1)), MAX_BLOCK_C)
    rows = max(1, min(64, 4096 // block_c, triton.next_power_of_2(max(n_rows, 1))))
    return block_c, rows, 4 if block_c * rows <= 2048 else 8


@triton.jit
def _kl_div_fwd_kernel(
    s_ptr, t_ptr,  # (B, C) logits, row stride s_stride / t_stride, unit column stride
    loss_ptr,  # (B,) fp32/fp64 per-row loss
    gs_ptr, gt_ptr,  # (B, C) contiguous gradients, in the logits' dtype
    B, C, s_stride, t_stride, inv_tau, tau,
    ACC: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    # Rows past B re-read row B−1 (their results are not stored), so no lane sees −inf − −inf.
    read_rows = tl.minimum(rows, B - 1)
    cols = tl.arange(0, BLOCK_C)
    s_row = s_ptr + read_rows[:, None] * s_stride
    t_row = t_ptr + read_rows[:, None] * t_stride
    g_row = rows[:, None] * C

    if SINGLE_TILE:
        mask = cols[None, :] < C
        store = row_ok[:, None] & mask
        xs = tl.load(s_row + cols[None, :], mask=mask, other=float("-inf")).to(ACC) * inv_tau
        xt = tl.load(t_row + cols[None, :], mask=mask, other=float("-inf")).to(ACC) * inv_tau
        # log p = (x − max) − log Σ e^(x − max): never forms max + log Σ, which loses digits
        # when |x| is large (logits of ±1e4).
        xs = xs - tl.max(xs, 1)[:, None]
        xt = xt - tl.max(xt, 1)[:, None]
        lps = xs - tl.log(tl.sum(tl.exp(xs), 1))[:, None]
        lpt = xt - tl.log(tl.sum(tl.exp(xt), 1))[:, None]
        pt = tl.exp(lpt)
        diff = tl.where(mask, lpt, 0.0) - tl.where(mask, lps, 0.0)  # padding: 0, not −inf − −inf
        kl = tl.sum(pt * diff, 1)
        tl.store(loss_ptr + rows, kl * tau * tau, mask=row_ok)
        if GRAD_S:
            gs = tau * (tl.exp(lps) - pt)
            tl.store(gs_ptr + g_row + cols[None, :], gs.to(gs_ptr.dtype.element_ty), mask=store)
        if GRAD_T:
            gt = tau * pt * (diff - kl[:, None])
            tl.store(gt_ptr + g_row + cols[None, :], gt.to(gt_ptr.dtype.element_ty), mask=store)
    else:
        # Pass 1, online over tiles: maxima m, sums S of e^(x − m), and
        # W = Σ e^(xt − m_t)·((xt − m_t) − (xs − m_s)), all rescaled when a maximum moves.
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
        tl.store(loss_ptr + rows, kl * tau * tau, mask=row_ok)
        if GRAD_S or GRAD_T:  # pass 2: the gradients
            for start in range(0, C, BLOCK_C):
                c = start + cols
                mask = row_ok[:, None] & (c[None, :] < C)
                xs = tl.load(s_row + c[None, :], mask=c[None, :] < C, other=0.0).to(ACC) * inv_tau
                xt = tl.load(t_row + c[None, :], mask=c[None, :] < C, other=0.0).to(ACC) * inv_tau
                lps = (xs - m_s[:, None]) - log_s[:, None]
                lpt = (xt - m_t[:, None]) - log_t[:, None]
                pt = tl.exp(lpt)
                if GRAD_S:
                    gs = tau * (tl.exp(lps) - pt)
                    tl.store(gs_ptr + g_row + c[None, :], gs.to(gs_ptr.dtype.element_ty), mask=mask)
                if GRAD_T:
                    gt = tau * pt * (lpt - lps - kl[:, None])
                    tl.store(gt_ptr + g_row + c[None, :], gt.to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l1_fwd_kernel(
    s_ptr, t_ptr,  # (B, C) logits, row stride s_stride / t_stride, unit column stride
    loss_ptr,  # (B,) per-row Σ|s − t|
    gs_ptr,  # (B, C) contiguous sign(s − t), in the logits' dtype
    B, C, s_stride, t_stride,
    ACC: tl.constexpr, GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
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
        if GRAD:
            sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            tl.store(gs_ptr + rows[:, None] * C + c[None, :], sign.to(gs_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + rows, total, mask=row_ok)



def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def triton_kl_div_fwd(s: torch.Tensor, t: torch.Tensor, temperature: float, grad_s: bool, grad_t: bool):
    """(per-row loss, ∂row/∂s or empty, ∂row/∂t or empty); arguments already validated."""
    s, t = _rows_contiguous(s), _rows_contiguous(t)
    (B, C), acc = s.shape, acc_dtype(s.dtype)
    loss = torch.empty(B, dtype=acc, device=s.device)
    gs = torch.empty((B, C) if grad_s else (0,), dtype=s.dtype, device=s.device)
    gt = torch.empty((B, C) if grad_t else (0,), dtype=s.dtype, device=s.device)
    if B == 0:
        return loss, gs, gt
    block_c, rows, warps = launch_config(B, C)
    _kl_div_fwd_kernel[(triton.cdiv(B, rows),)](
        s, t, loss, gs, gt, B, C, s.stride(0), t.stride(0), 1.0 / temperature, float(temperature),
        ACC=TL_DTYPES[acc], GRAD_S=grad_s, GRAD_T=grad_t, ROWS=rows, BLOCK_C=block_c, SINGLE_TILE=C <= block_c,
        num_warps=warps)
    return loss, gs, gt


def triton_l1_fwd(s: torch.Tensor, t: torch.Tensor, grad: bool):
    """(per-row Σ|s − t|, sign(s − t) or empty); arguments already validated."""
    s, t = _rows_contiguous(s), _rows_contiguous(t)
    (B, C), acc = s.shape, acc_dtype(s.dtype)
    loss = torch.empty(B, dtype=acc, device=s.device)
    gs = torch.empty((B, C) if grad else (0,), dtype=s.dtype, device=s.device)
    if B == 0:
        return loss, gs
    block_c, rows, warps = launch_config(B, C)
    _l1_fwd_kernel[(triton.cdiv(B, rows),)](
        s, t, loss, gs, B, C, s.stride(0), t.stride(0),
        ACC=TL_DTYPES[acc], GRAD=grad, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    return loss, gs
