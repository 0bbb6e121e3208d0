"""Triton kernel of the EMA update: one launch per (ema dtype, tensor dtype) group.

Like csrc/cuda/ema.cu, each program owns BLOCK elements of one tensor and finds that tensor
by binary search in a device table of (ema address, tensor address, numel, first program)
rows, so the launch count does not grow with the number of tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from madfast.ops._dtypes import acc_dtype
from madfast.ops._triton import TL_DTYPES

__all__ = ["triton_ema_update_"]

BLOCK = 4096


@triton.jit
def _ema_multi_tensor_kernel(
    table_ptr,  # int64 [n_tensors, 4]: ema address, tensor address, numel, first program
    n_tensors,
    weight_ptr,  # fp64 []: 1 - decay, formed in double
    EMA_DTYPE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # Last row whose first program is <= pid.
    lo = pid * 0
    hi = lo + n_tensors - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        go_right = tl.load(table_ptr + mid * 4 + 3) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid - 1)
    row = table_ptr + lo * 4
    ema_ptr = tl.load(row).to(tl.pointer_type(EMA_DTYPE))
    param_ptr = tl.load(row + 1).to(tl.pointer_type(PARAM_DTYPE))
    numel = tl.load(row + 2)
    offs = (pid - tl.load(row + 3)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel

    w = tl.load(weight_ptr).to(ACC_DTYPE)
    e = tl.load(ema_ptr + offs, mask=mask).to(ACC_DTYPE)
    p = tl.load(param_ptr + offs, mask=mask).to(ACC_DTYPE)
    # torch.lerp's two-branch formula (csrc/ema.h ema_value); weight 1 (decay 0) is an exact copy
    v = tl.where(w < 0.5, tl.fma(w, p - e, e), tl.fma(w - 1.0, p - e, p))
    v = tl.where(w == 1.0, p, v)
    tl.store(ema_ptr + offs, v.to(EMA_DTYPE), mask=mask)


def _flat_pair(e: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors the kernel may read as flat arrays in memory order (see csrc/ema.h FlatPair): the
    layouts a model's tensors have are read in place, any other through a contiguous copy."""
    if not (e.is_contiguous() or (e.dim() == 4 and e.is_contiguous(memory_format=torch.channels_last))):
        return e.contiguous(), p.contiguous()
    return e, (p if p.stride() == e.stride() else torch.empty_like(e, dtype=p.dtype).copy_(p))


def _table(pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> tuple[torch.Tensor, int]:
    rows, blocks = [], 0
    for e, p in pairs:
        rows.append((e.data_ptr(), p.data_ptr(), e.numel(), blocks))
        blocks += triton.cdiv(e.numel(), BLOCK)
    host = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True), blocks


def triton_ema_update_(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], weight: torch.Tensor) -> None:
    """Runs the Triton kernel; arguments already validated (madfast.ops.ema.op); weight = 1 − decay, fp64."""
    copies = [(e, p) for e, p in zip(ema_tensors, tensors) if not e.is_floating_point()]
    if copies:
        torch._foreach_copy_([e for e, _ in copies], [p for _, p in copies])
    groups: dict[tuple[torch.dtype, torch.dtype], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for e, p in zip(ema_tensors, tensors):
        if e.is_floating_point() and e.numel() > 0:
            groups.setdefault((e.dtype, p.dtype), []).append((e, p))
    if not groups:
        return
    device = ema_tensors[0].device
    for (ema_dtype, param_dtype), pairs in groups.items():
        acc = acc_dtype(ema_dtype)
        work = [_flat_pair(e, p) for e, p in pairs]
        table, blocks = _table(work, device)
        _ema_multi_tensor_kernel[(blocks,)](
            table, len(work), weight.to(device=device, dtype=torch.float64),
            EMA_DTYPE=TL_DTYPES[ema_dtype], PARAM_DTYPE=TL_DTYPES[param_dtype],
            ACC_DTYPE=TL_DTYPES[acc],
            BLOCK=BLOCK, num_warps=8,
        )
        for (e, _), (w, _) in zip(pairs, work):
            if w is not e:
                e.copy_(w)
