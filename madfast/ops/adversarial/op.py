"""madfast.ops.adversarial_loss: the bounded discrepancy, reduced, bounded and negated inside the
fused logit-loss ops (madfast.ops.kl.op): no host sync, two dispatched ops per forward+backward."""

from __future__ import annotations

import torch

from madfast import _backend
from madfast.ops._checks import check_choice
from madfast.ops.adversarial.reference import KINDS, torch_adversarial_loss
from madfast.ops.kl.op import check_kl_args, kl_loss, l1_loss

__all__ = ["adversarial_loss"]


def adversarial_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, bound: float | None = None,
                     kind: str = "kl", temperature: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """The generator's adversarial loss −min(D(t, s), bound); −D when bound is None.

    Args:
        student_logits, teacher_logits: (B, C) logits, same dtype and device.
        bound: δ, the bound on the discrepancy (None: unbounded); the gradient is zero past it
            (a device-side clamp: no host sync).
        kind: "kl" (D = batchmean KL(t/τ ‖ s/τ)·τ²) or "l1" (D = mean |s − t|, DFAD).
        temperature: τ > 0 (used by "kl").
        backend: "auto", "torch", "triton", "cuda" or "cpp".
    Returns:
        A 0-d tensor in the logits' dtype.
    """
    check_kl_args("adversarial_loss", student_logits, teacher_logits, temperature)
    check_choice("adversarial_loss", "kind", kind, KINDS)
    if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float))):
        raise TypeError(f"adversarial_loss: bound must be a number or None, got {type(bound).__name__}")
    chosen = _backend.choose("kl_div_fwd" if kind == "kl" else "l1_fwd", backend, student_logits.device)
    if chosen == "torch":
        return torch_adversarial_loss(student_logits, teacher_logits, bound, kind, temperature)
    if kind == "kl":
        return kl_loss(student_logits, teacher_logits, temperature, "batchmean", -1.0, bound, chosen)
    return l1_loss(student_logits, teacher_logits, "mean", -1.0, bound, chosen)
