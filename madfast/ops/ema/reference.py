"""The torch reference of the EMA update: the CPU fallback and the test oracle."""

from __future__ import annotations

import torch

from madfast.ops._dtypes import acc_dtype

__all__ = ["torch_ema_update_"]


@torch.no_grad()
def torch_ema_update_(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], decay: torch.Tensor) -> None:
    """ema ← ema + (1 − decay)·(tensor − ema) in fp32 (fp64 for fp64); non-floating pairs copied."""
    floats = [(e, p) for e, p in zip(ema_tensors, tensors) if e.is_floating_point()]
    copies = [(e, p) for e, p in zip(ema_tensors, tensors) if not e.is_floating_point()]
    if copies:
        torch._foreach_copy_([e for e, _ in copies], [p for _, p in copies])
    if not floats:
        return
    wide = [acc_dtype(e.dtype) for e, _ in floats]
    acc = [e.to(w) for (e, _), w in zip(floats, wide)]  # e itself when already wide
    src = [p.to(w) for (_, p), w in zip(floats, wide)]
    decay = decay.to(acc[0].device)
    weights = {w: 1 - decay.to(w) for w in set(wide)}
    torch._foreach_lerp_(acc, src, [weights[w] for w in wide])
    narrow = [(e, a) for (e, _), a in zip(floats, acc) if a is not e]
    if narrow:
        torch._foreach_copy_([e for e, _ in narrow], [a for _, a in narrow])
