"""Triton kernels of the per-channel moments of BatchNorm inputs — many layers per launch — and of
DeepInversion's BN loss over them, forward and backward.

Work split (as csrc/cuda/bn_stat_losses.cuh). A layer's x (N, C, H, W) is reduced per channel over
(N, H, W). NCHW: a program takes one channel and a range of BLOCK-value chunks of its contiguous
H×W runs (no index division per element). channels_last: a program takes BLOCK_C channels and a
range of BLOCK_P-position tiles, coalesced along C. Each channel (group) is split over enough
programs to give ~4 per multiprocessor, so a 64-channel stem layer still fills the GPU.

Many layers per launch. The layers of one (dtype, layout) group, up to MAX_LAYERS, travel as tuples
of pointers in the kernel's arguments (nothing is copied to the device per call: safe in CUDA
graphs); their sizes live in a small int64 table that depends only on the shapes, built once per
set of shapes and kept on the device. A program finds its layer by counting the layers whose first
program precedes it.

Moments in fp32 (fp64 only for fp64 inputs) from chunk partials: each chunk's count, mean and M2
(two passes over the chunk in registers, Σd² − (Σd)²/n correcting the chunk mean's rounding) of the
values less a pivot, the channel's first value, merged with Chan's formula in a fixed order, within a
program and then across its splits; the pivot is added back once at the end. Every sum stays of the
size of the spread even when |mean| ≫ std (x − pivot is exact there), and so do the merges of
one-value chunks (H·W = 1) and of partial means. Deterministic, no atomics.

Launches. BN loss forward: partials (one per group), finalize (a program per layer: merges its
partials in split order, writes the moments and the distances ‖mean − running_mean‖ and
‖var − running_var‖), and the sum of those norms. Backward: one per group, over the forward's
programs, grad_x = a_c + b_c (x − mean_c) with a_c, b_c formed once per channel from the saved
moments and norms and the upstream gradient read on the device (no host sync). ``channel_moments``
is the one-layer case without norms; its own backward, given the gradients of the mean and the
variance, is ``triton_channel_moments_backward``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from madfast.ops._dtypes import acc_dtype
from madfast.ops._layout import kernel_memory_format
from madfast.ops._triton import TL_DTYPES
from madfast.ops.bn_stats.layers import check_layers, layer_key, layers_key

__all__ = ["triton_channel_moments", "triton_channel_moments_backward", "triton_bn_stat_losses",
           "triton_bn_stat_losses_backward", "moments_view", "MAX_LAYERS"]

BLOCK = 1024  # NCHW: elements per chunk
BLOCK_P, BLOCK_C = 64, 32  # channels_last: positions × channels per tile
MAX_SPLITS, MIN_STEPS = 64, 8  # partials per channel; chunks / tiles each split reads at least
MAX_LAYERS = 32  # per launch: the backward's four pointer tuples take 32 × 32 B of kernel arguments
# The layer table, one int64 row per layer: first program (in its launch), N, C, H·W, splits, steps
# per split, first partial, first moments column, position in the call, and a pad to 80 B (so that
# every launch's slice of the table stays 16-byte aligned: one specialization).
ROW = tl.constexpr(10)


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
    """Chan et al.: (count, mean, M2) of the union of two disjoint sets (either may be empty)."""
    n = n_a + n_b
    fb = n_b / tl.maximum(n, 1.0)
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
def _layer_of(pid, tab_ptr, NUM: tl.constexpr):
    """The launch's layer that holds program ``pid``: the last whose first program is ≤ pid (a layer
    without programs is passed over: the next one starts where it would have)."""
    li = 0
    for j in tl.static_range(1, NUM):
        li += (tl.load(tab_ptr + j * ROW) <= pid).to(tl.int32)
    return li


@triton.jit
def _pick(ptrs, li, NUM: tl.constexpr):
    """ptrs[li] for a runtime li (a tuple is indexed by constants only)."""
    p = ptrs[0]
    for j in tl.static_range(1, NUM):
        if li == j:
            p = ptrs[j]
    return p


@triton.jit
def _program_of(tab_ptr, NUM: tl.constexpr):
    """This program's layer (its index in the launch and its table row), channel group and split."""
    pid = tl.program_id(0)
    li = _layer_of(pid, tab_ptr, NUM)
    row = tab_ptr + li * ROW
    local = pid - tl.load(row)
    splits = tl.load(row + 4)
    group = local // splits
    return li, row, group, local - group * splits


@triton.jit
def _partials_kernel(
    xs,  # tuple of NUM layer inputs, contiguous (NCHW) or channels_last
    tab_ptr,  # (NUM, ROW) int64, the launch's rows of the layer table
    part_ptr, part_stride,  # (4, part_stride): count, mean − pivot, M2, pivot of channel c's split s at
    # first + c·S + s (the pivot, the channel's first value, is the same for all its splits)
    NUM: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    li, row, group, split = _program_of(tab_ptr, NUM)
    x_ptr = _pick(xs, li, NUM)
    N, C, HW = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    S, PER, part = tl.load(row + 4), tl.load(row + 5), tl.load(row + 6)
    if CHANNELS_LAST:  # PER positions (a multiple of BLOCK_P) × BLOCK_C channels
        c = group * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        cnt = tl.zeros((BLOCK_C,), ACC)
        mean = tl.zeros((BLOCK_C,), ACC)
        m2 = tl.zeros((BLOCK_C,), ACC)
        p0 = split * PER
        p1 = tl.minimum(p0 + PER, N * HW)
        pivot = tl.load(x_ptr + c, mask=c_ok & (p0 < p1), other=0.0).to(ACC)  # position 0
        for start in range(p0, p1, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            mask = (p[:, None] < p1) & c_ok[None, :]
            x = tl.load(x_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
            x = tl.where(mask, x - pivot[None, :], 0.0)
            n_c, mean_c, m2_c = _chunk_moments(x, mask, tl.minimum(p1 - start, BLOCK_P).to(ACC))
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, n_c, mean_c, m2_c)
        at = part + c * S + split
        tl.store(part_ptr + at, cnt, mask=c_ok)
        tl.store(part_ptr + part_stride + at, mean, mask=c_ok)
        tl.store(part_ptr + 2 * part_stride + at, m2, mask=c_ok)
        tl.store(part_ptr + 3 * part_stride + at, pivot, mask=c_ok)
    else:  # PER chunks of BLOCK values of channel `group`'s H×W runs
        chunks_n = tl.cdiv(HW, BLOCK)
        cnt = tl.zeros((), ACC)
        mean = tl.zeros((), ACC)
        m2 = tl.zeros((), ACC)
        k0 = split * PER
        k1 = tl.minimum(k0 + PER, N * chunks_n)
        pivot = tl.load(x_ptr + group * HW, mask=k0 < k1, other=0.0).to(ACC)  # position 0
        for k in range(k0, k1):
            n = k // chunks_n  # once per chunk of BLOCK values
            start = (k - n * chunks_n) * BLOCK
            i = start + tl.arange(0, BLOCK)
            mask = i < HW
            x = tl.load(x_ptr + (n * C + group) * HW + i, mask=mask, other=0.0).to(ACC)
            x = tl.where(mask, x - pivot, 0.0)
            n_c, mean_c, m2_c = _chunk_moments(x, mask, tl.minimum(HW - start, BLOCK).to(ACC))
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, n_c, mean_c, m2_c)
        at = part + group * S + split
        tl.store(part_ptr + at, cnt)
        tl.store(part_ptr + part_stride + at, mean)
        tl.store(part_ptr + 2 * part_stride + at, m2)
        tl.store(part_ptr + 3 * part_stride + at, pivot)


@triton.jit
def _finalize_kernel(
    tab_ptr, part_ptr, part_stride,
    rms, rvs,  # tuples of NUM running statistics (acc dtype, contiguous); not read without NORMS
    mean_ptr, var_ptr,  # a layer's moments at its columns
    norms_ptr, layers,  # (2, layers): a layer's two distances at its position in the call
    NUM: tl.constexpr, NORMS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    li = tl.program_id(0)
    row = tab_ptr + li * ROW
    C, S, part, col = tl.load(row + 2), tl.load(row + 4), tl.load(row + 6), tl.load(row + 7)
    sm = tl.zeros((BLOCK_C,), ACC)
    sv = tl.zeros((BLOCK_C,), ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        at = part + c * S
        cnt = tl.load(part_ptr + at, mask=c_ok, other=0.0)
        mean = tl.load(part_ptr + part_stride + at, mask=c_ok, other=0.0)
        m2 = tl.load(part_ptr + 2 * part_stride + at, mask=c_ok, other=0.0)
        for s in range(1, S):  # split order: deterministic
            n_b = tl.load(part_ptr + at + s, mask=c_ok, other=0.0)
            mean_b = tl.load(part_ptr + part_stride + at + s, mask=c_ok, other=0.0)
            m2_b = tl.load(part_ptr + 2 * part_stride + at + s, mask=c_ok, other=0.0)
            cnt, mean, m2 = _chan_merge(cnt, mean, m2, n_b, mean_b, m2_b)
        mean = tl.load(part_ptr + 3 * part_stride + at, mask=c_ok, other=0.0) + mean
        mean = tl.where(cnt > 0, mean, float("nan"))  # no values (N·H·W = 0): NaN, as torch's var_mean
        var = tl.where(cnt > 0, m2 / tl.maximum(cnt, 1.0), float("nan"))
        tl.store(mean_ptr + col + c, mean, mask=c_ok)
        tl.store(var_ptr + col + c, var, mask=c_ok)
        if NORMS:
            dm = tl.where(c_ok, mean - tl.load(_pick(rms, li, NUM) + c, mask=c_ok, other=0.0), 0.0)
            dv = tl.where(c_ok, var - tl.load(_pick(rvs, li, NUM) + c, mask=c_ok, other=0.0), 0.0)
            sm += dm * dm
            sv += dv * dv
    if NORMS:
        index = tl.load(row + 8)
        tl.store(norms_ptr + index, tl.sqrt(tl.sum(sm, 0)))
        tl.store(norms_ptr + layers + index, tl.sqrt(tl.sum(sv, 0)))


@triton.jit
def _bn_grad_kernel(
    xs, outs, rms, rvs,  # tuples of NUM: inputs, their gradients (same layouts), running statistics
    tab_ptr,  # as in _partials_kernel, whose programs this kernel repeats
    grad_ptr,  # the loss's upstream gradient: one value, read on the device
    mean_ptr, var_ptr, norms_ptr, layers,  # the forward's moments and norms
    NUM: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    li, row, group, split = _program_of(tab_ptr, NUM)
    x_ptr = _pick(xs, li, NUM)
    out_ptr = _pick(outs, li, NUM)
    rm_ptr = _pick(rms, li, NUM)
    rv_ptr = _pick(rvs, li, NUM)
    N, C, HW = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)
    PER, col, index = tl.load(row + 5), tl.load(row + 7), tl.load(row + 8)
    # d‖u‖/du = u/‖u‖ (0 at u = 0, as torch.linalg.vector_norm's backward), then through the moments:
    # grad_x = g_mean/M + 2 g_var (x − mean)/M
    g = tl.load(grad_ptr).to(ACC)
    nm = tl.load(norms_ptr + index)
    nv = tl.load(norms_ptr + layers + index)
    inv_m = 1.0 / (N * HW).to(ACC)
    if CHANNELS_LAST:
        c = group * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        mu = tl.load(mean_ptr + col + c, mask=c_ok, other=0.0)
        var = tl.load(var_ptr + col + c, mask=c_ok, other=0.0)
        a = tl.where(nm > 0, g * (mu - tl.load(rm_ptr + c, mask=c_ok, other=0.0)) / nm, 0.0) * inv_m
        b = tl.where(nv > 0, g * (var - tl.load(rv_ptr + c, mask=c_ok, other=0.0)) / nv, 0.0) * (2 * inv_m)
        p0 = split * PER
        p1 = tl.minimum(p0 + PER, N * HW)
        for start in range(p0, p1, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)
            mask = (p[:, None] < p1) & c_ok[None, :]
            offs = p[:, None] * C + c[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            y = a[None, :] + b[None, :] * (x - mu[None, :])
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        mu = tl.load(mean_ptr + col + group)
        var = tl.load(var_ptr + col + group)
        a = tl.where(nm > 0, g * (mu - tl.load(rm_ptr + group)) / nm, 0.0) * inv_m
        b = tl.where(nv > 0, g * (var - tl.load(rv_ptr + group)) / nv, 0.0) * (2 * inv_m)
        chunks_n = tl.cdiv(HW, BLOCK)
        k0 = split * PER
        for k in range(k0, tl.minimum(k0 + PER, N * chunks_n)):
            n = k // chunks_n
            start = (k - n * chunks_n) * BLOCK
            i = start + tl.arange(0, BLOCK)
            mask = i < HW
            offs = (n * C + group) * HW + i
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            tl.store(out_ptr + offs, (a + b * (x - mu)).to(out_ptr.dtype.element_ty), mask=mask)


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


# ---- host side ----

@dataclass(frozen=True)
class _Launch:
    channels_last: bool
    rows: slice  # of the layer table
    layers: tuple[int, ...]  # positions in the call's list, in row order
    programs: int


@dataclass(frozen=True)
class _Plan:
    table: torch.Tensor  # (layers, ROW) int64 on the device, rows in launch order
    launches: tuple[_Launch, ...]
    parts: int  # partials (per channel and split) of every layer
    columns: int  # channels of every layer
    acc: torch.dtype


def _programs(n: int, c: int, hw: int, channels_last: bool, device: torch.device) -> tuple[int, int, int]:
    """(programs, splits per channel group, steps per split) of one layer; a channels_last step is
    counted in positions."""
    if channels_last:
        groups, steps, unit = triton.cdiv(c, BLOCK_C), triton.cdiv(n * hw, BLOCK_P), BLOCK_P
    else:
        groups, steps, unit = c, n * triton.cdiv(hw, BLOCK), 1
    splits = moment_splits(groups, steps, device)
    return groups * splits, splits, triton.cdiv(steps, splits) * unit


@functools.lru_cache(maxsize=64)
def _plan(key: tuple, op: str) -> _Plan:
    """The launches and the device table for one set of layer shapes; the arguments are validated
    here, on first sight of the key (which holds everything the checks look at)."""
    check_layers(key, op)
    device = key[0][2]
    groups: dict[tuple, list[int]] = {}  # (dtype, channels_last) -> layers, in call order
    cols = [0]
    for i, (dtype, shape, _, channels_last, _) in enumerate(key):
        groups.setdefault((dtype, channels_last), []).append(i)
        cols.append(cols[-1] + shape[1])
    rows, launches, parts = [], [], 0
    for (_, channels_last), members in groups.items():
        for i in range(0, len(members), MAX_LAYERS):
            chunk, first = members[i:i + MAX_LAYERS], 0
            for layer in chunk:
                n, c, h, w = key[layer][1]
                programs, splits, per = _programs(n, c, h * w, channels_last, device)
                rows.append((first, n, c, h * w, splits, per, parts, cols[layer], layer, 0))
                first += programs
                parts += c * splits
            launches.append(_Launch(channels_last, slice(len(rows) - len(chunk), len(rows)), tuple(chunk), first))
    acc = torch.float64 if any(k[0] == torch.float64 for k in key) else torch.float32
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    return _Plan(table, tuple(launches), parts, cols[-1], acc)


def _prepared(xs, rms, rvs, op: str):
    """The plan, the inputs readable in place (other layouts copied) and the running statistics in
    the acc dtype; O(1) Python work per layer when the shapes were seen before."""
    key = layers_key(xs, rms, rvs, op)
    plan = _plan(key, op)
    xs = [x if k[3] or x.is_contiguous() else x.contiguous() for x, k in zip(xs, key)]
    rms, rvs = ([t if t.dtype == plan.acc and t.is_contiguous() else t.to(plan.acc).contiguous() for t in ts]
                for ts in (rms, rvs))
    return plan, xs, rms, rvs


def _of(launch: _Launch, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(tensors[i] for i in launch.layers)


def _partials(plan: _Plan, xs: list[torch.Tensor]) -> torch.Tensor:
    part = torch.empty(4, max(plan.parts, 1), dtype=plan.acc, device=xs[0].device)
    for launch in plan.launches:
        if launch.programs:
            _partials_kernel[(launch.programs,)](
                _of(launch, xs), plan.table[launch.rows], part, part.shape[1],
                NUM=len(launch.layers), CHANNELS_LAST=launch.channels_last, ACC=TL_DTYPES[plan.acc], BLOCK=BLOCK,
                BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4 if launch.channels_last else 8)
    return part


def _finalize(plan: _Plan, part: torch.Tensor, rms, rvs, mean: torch.Tensor, var: torch.Tensor,
              norms: torch.Tensor | None) -> None:
    """Moments into mean/var at each layer's columns; with norms, the distances to rms/rvs too."""
    for launch in plan.launches:
        num = len(launch.layers)
        stats = [_of(launch, ts) if norms is not None else (part,) * num for ts in (rms, rvs)]
        _finalize_kernel[(num,)](
            plan.table[launch.rows], part, part.shape[1], *stats, mean, var, mean if norms is None else norms,
            norms.shape[1] if norms is not None else 1, NUM=num, NORMS=norms is not None, ACC=TL_DTYPES[plan.acc],
            BLOCK_C=BLOCK_C, num_warps=1)


def triton_bn_stat_losses(xs: list[torch.Tensor], rms: list[torch.Tensor], rvs: list[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """madfast::bn_stat_losses in Triton: (loss, moments (2, ΣC), norms (2, layers)), acc dtype."""
    plan, xs, rms, rvs = _prepared(xs, rms, rvs, "bn_stat_losses")
    moments = torch.empty(2, plan.columns, dtype=plan.acc, device=xs[0].device)
    norms = torch.empty(2, len(xs), dtype=plan.acc, device=xs[0].device)
    _finalize(plan, _partials(plan, xs), rms, rvs, moments[0], moments[1], norms)
    return norms.sum(), moments, norms


def triton_bn_stat_losses_backward(grad: torch.Tensor, xs: list[torch.Tensor], rms: list[torch.Tensor],
                                   rvs: list[torch.Tensor], moments: torch.Tensor, norms: torch.Tensor
                                   ) -> list[torch.Tensor]:
    """madfast::bn_stat_losses_backward in Triton: every grad_x, in its x's dtype and layout."""
    op = "bn_stat_losses_backward"
    plan, xs, rms, rvs = _prepared(xs, rms, rvs, op)
    if grad.numel() != 1:
        raise ValueError(f"{op}: grad_loss must hold one value, got shape {list(grad.shape)}")
    if grad.device != xs[0].device:
        raise ValueError(f"{op}: grad_loss is on {grad.device} but x is on {xs[0].device}")
    for name, t, shape in (("moments", moments, (2, plan.columns)), ("norms", norms, (2, len(xs)))):
        if tuple(t.shape) != shape or not t.is_contiguous() or t.dtype != plan.acc:
            raise ValueError(f"{op}: {name} must be the forward's contiguous {shape} {plan.acc} tensor, "
                             f"got {list(t.shape)} {t.dtype}")
    outs = [torch.empty_like(x) for x in xs]  # x's layout: memory orders match
    for launch in plan.launches:
        if launch.programs:
            pick = [_of(launch, ts) for ts in (xs, outs, rms, rvs)]
            _bn_grad_kernel[(launch.programs,)](
                *pick, plan.table[launch.rows], grad, moments[0], moments[1], norms, len(xs),
                NUM=len(launch.layers), CHANNELS_LAST=launch.channels_last, ACC=TL_DTYPES[plan.acc],
                BLOCK=BLOCK, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4 if launch.channels_last else 8)
    return outs


def triton_channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (N, C, H, W), (C,) each in the acc dtype; the
    one-layer BN plan without norms (x already validated)."""
    x = moments_view(x)[0]
    acc = acc_dtype(x.dtype)
    stat = (acc, x.shape[1:2], x.device)
    plan = _plan((layer_key(x, (stat, stat)),), "channel_moments")
    mean = torch.empty(x.shape[1], dtype=acc, device=x.device)
    var = torch.empty_like(mean)
    _finalize(plan, _partials(plan, [x]), None, None, mean, var, None)
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
