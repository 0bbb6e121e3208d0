"""Torch reference of the temperature-scaled KL divergence (the CPU fallback and test oracle), and the
outputs every backend of the logit losses allocates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from madfast.ops._dtypes import acc_dtype

__all__ = ["torch_kl_div", "REDUCTIONS", "N_STATS", "loss_outputs"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")
N_STATS = 5  # the KL ops' row statistics: max_s, log_s, max_t, log_t, kl (csrc/logit_losses.h KlStat)


def loss_outputs(s: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, total) as the compiled ops allocate them: the loss in the logits' dtype ((B,) rows for
    "none"), the reduced total in the accumulation dtype (empty for "none")."""
    acc = acc_dtype(s.dtype)
    if reduction == "none":
        return s.new_empty(s.shape[0]), s.new_empty(0, dtype=acc)
    return s.new_empty(()), s.new_empty((), dtype=acc)


def torch_kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ))·τ², computed in fp32 (fp64 for fp64); "none" gives one value per row."""
    acc = acc_dtype(student_logits.dtype)
    log_p_s = F.log_softmax(student_logits.to(acc) / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.to(acc) / temperature, dim=1)
    rows = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1) * temperature**2
    if reduction == "none":
        out = rows
    elif reduction == "sum":
        out = rows.sum()
    elif reduction == "batchmean":
        out = rows.sum() / rows.numel()
    else:  # "mean": over every element, as torch defines it
        out = rows.sum() / student_logits.numel()
    return out.to(student_logits.dtype)
