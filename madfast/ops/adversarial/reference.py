"""Torch reference of the bounded adversarial loss −min(D(t, s), bound)."""

from __future__ import annotations

import torch

from madfast.ops._dtypes import acc_dtype
from madfast.ops.kl.reference import torch_kl_div

__all__ = ["torch_adversarial_loss", "KINDS"]

KINDS = ("kl", "l1")


def torch_adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, bound: float | None = None,
                           kind: str = "kl", temperature: float = 1.0) -> torch.Tensor:
    """−min(D, bound) (−D without a bound); D is batchmean KL·τ² ("kl") or mean |s − t| ("l1", DFAD)."""
    if kind == "kl":
        d = torch_kl_div(student_logits, teacher_logits, temperature, "batchmean")
    else:
        acc = acc_dtype(student_logits.dtype)
        d = (student_logits.to(acc) - teacher_logits.to(acc)).abs().mean().to(student_logits.dtype)
    if bound is not None:
        d = torch.clamp(d, max=bound)  # gradient zero past the bound
    return -d
