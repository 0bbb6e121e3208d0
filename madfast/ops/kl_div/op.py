"""madfast.ops.kl_div: validation, backend choice and registration."""

from __future__ import annotations

import torch

from madfast import _backend
from madfast.ops._checks import check_choice, check_floating, check_positive, check_same
from madfast.ops.kl_div.reference import REDUCTIONS, torch_kl_div

__all__ = ["kl_div", "check_kl_args"]


def check_kl_args(op: str, student_logits, teacher_logits, temperature) -> None:
    check_floating(op, "student_logits", student_logits, ndim=2)
    check_floating(op, "teacher_logits", teacher_logits, ndim=2)
    check_same(op, "teacher_logits", teacher_logits, "student_logits", student_logits)
    check_positive(op, "temperature", temperature)


def kl_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
           reduction: str = "batchmean", *, backend: str = "auto") -> torch.Tensor:
    """KL(softmax(t/τ) ‖ softmax(s/τ))·τ², gradients to both inputs.

    Same as ``F.kl_div(F.log_softmax(s/τ, 1), F.log_softmax(t/τ, 1), reduction, log_target=True)·τ²``
    except that ``reduction="none"`` gives one value per row.

    Args:
        student_logits: (B, C) logits of the student, C ≥ 1.
        teacher_logits: (B, C) logits of the teacher, same dtype and device.
        temperature: τ > 0.
        reduction: "batchmean" (sum / B), "sum", "mean" (sum / (B·C)) or "none" ((B,) per row).
        backend: see madfast._backend.
    Returns:
        A 0-d tensor, or (B,) for "none", in the logits' dtype (accumulated in fp32).
    """
    check_kl_args("kl_div", student_logits, teacher_logits, temperature)
    check_choice("kl_div", "reduction", reduction, REDUCTIONS)
    _backend.choose("kl_div", backend, student_logits.device)  # fused backends: coming with their kernels
    return torch_kl_div(student_logits, teacher_logits, temperature, reduction)
