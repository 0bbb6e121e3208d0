"""The torch reference of the EMA update: the CPU fallback, and the twin of csrc/ema.h's math."""

from __future__ import annotations

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from madfast.ops._dtypes import acc_dtype

__all__ = ["torch_ema_update_", "sr_pair_key", "stochastic_round"]

_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser on Python ints (csrc/ema.h mix64)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def sr_pair_key(seed: int, step: int, pair: int) -> int:
    """The per-pair key of stochastic rounding's random bits (csrc/ema.h sr_call_key/sr_pair_key)."""
    return _mix64(_mix64(_mix64(seed & _M64) ^ (step & _M64)) ^ (pair & _M64))


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 holding uint64 bits (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _uniform(pair_key: int, n: int, device: torch.device) -> torch.Tensor:
    """sr_uniform for elements 0..n-1 of a pair, in int64 arithmetic (it wraps like uint64)."""
    z = torch.arange(n, dtype=torch.int64, device=device) * _signed(0x9E3779B97F4A7C15) + _signed(pair_key)
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    return _shr(z, 40).to(torch.float32) * 2.0**-24


def stochastic_round(v: torch.Tensor, dtype: torch.dtype, u: torch.Tensor) -> torch.Tensor:
    """fp32 ``v`` rounded to fp16/bf16: away from zero with probability (|v| − |down|)/(|up| − |down|)."""
    down = v.to(dtype)
    bits = down.view(torch.int16)
    bits = torch.where(down.float().abs() > v.abs(), bits - 1, bits)  # toward zero (sign-magnitude)
    lo = bits.view(dtype).float().abs()
    hi = (bits + 1).view(dtype).float().abs()
    p = (v.abs() - lo) / (hi - lo)
    out = torch.where(u < p, bits + 1, bits).view(dtype)
    return torch.where(v.isfinite(), out, v.to(dtype))


@torch.no_grad()
def torch_ema_update_(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], decay: float | torch.Tensor,
                      sr_seed: int | None = None, sr_step: int = 0) -> None:
    """ema ← lerp(ema, tensor, 1 − decay) in fp32 (fp64 for an fp64 EMA), 1 − decay formed in double;
    decay 0 copies exactly; non-floating pairs copied; with ``sr_seed``, fp16/bf16 EMAs are rounded
    stochastically."""
    if sr_seed is None and not isinstance(decay, torch.Tensor):
        ema_tensors, tensors = _foreach_update_(ema_tensors, tensors, decay)
    for i, (e, p) in enumerate(zip(ema_tensors, tensors)):
        if not e.is_floating_point():
            e.copy_(p)
            continue
        acc = acc_dtype(e.dtype)
        if isinstance(decay, torch.Tensor):
            w = (1 - decay.to(device=e.device, dtype=torch.float64)).to(acc)
        else:
            w = torch.tensor(1.0 - decay, dtype=torch.float64).to(acc).to(e.device)
        ea, pa = e.to(acc), p.to(acc)
        v = torch.where(w == 1, pa, torch.lerp(ea, pa, w))
        if sr_seed is not None and e.dtype in (torch.float16, torch.bfloat16):
            u = _uniform(sr_pair_key(sr_seed, sr_step, i), e.numel(), e.device)
            # the kernels number a dense EMA's elements in memory order, any other in logical order
            u = u.as_strided(e.shape, e.stride()) if is_non_overlapping_and_dense(e) else u.view(e.shape)
            v = torch.where(w == 1, v.to(e.dtype), stochastic_round(v, e.dtype, u))
        e.copy_(v)


def _foreach_update_(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], decay: float):
    """The common case in one ``torch._foreach_lerp_`` (or ``_foreach_copy_`` at decay 0) per
    (dtype, device) group of same-dtype floating pairs: the same arithmetic as the loop below (lerp in
    the accumulation dtype with 1 − decay formed in double, then rounded to it) without its
    temporaries. Returns the pairs left to the loop (mixed dtypes, non-floating)."""
    groups: dict[tuple, tuple[list, list]] = {}
    rest_e, rest_p = [], []
    for e, p in zip(ema_tensors, tensors):
        if e.is_floating_point() and p.dtype == e.dtype and p.device == e.device:
            es, ps = groups.setdefault((e.dtype, e.device), ([], []))
            es.append(e)
            ps.append(p)
        else:
            rest_e.append(e)
            rest_p.append(p)
    for (dtype, _), (es, ps) in groups.items():
        w = torch.tensor(1.0 - decay, dtype=torch.float64).to(acc_dtype(dtype)).item()
        if w == 1:
            torch._foreach_copy_(es, ps)
        else:
            torch._foreach_lerp_(es, ps, w)
    return rest_e, rest_p
