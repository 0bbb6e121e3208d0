"""Loss modules over madfast's fused loss ops."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from madfast.ops import adversarial_loss, bn_stat_loss, kl_div

__all__ = ["KLDivLoss", "AdversarialLoss", "BNStatHook"]


class KLDivLoss(nn.Module):
    """``kl_div(student_logits, teacher_logits)``: KL(softmax(t/τ) ‖ softmax(s/τ))·τ²."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kl_div(student_logits, teacher_logits, self.temperature, self.reduction, backend=self.backend)


class AdversarialLoss(nn.Module):
    """``adversarial_loss(student_logits, teacher_logits)``: −min(D(t, s), bound)."""

    def __init__(self, bound: float | None = None, kind: str = "kl", temperature: float = 1.0,
                 backend: str = "auto"):
        super().__init__()
        self.bound, self.kind, self.temperature, self.backend = bound, kind, temperature, backend

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return adversarial_loss(student_logits, teacher_logits, self.bound, self.kind, self.temperature,
                                backend=self.backend)


class BNStatHook:
    """Registers DeepInversion's BN-statistics loss on every BatchNorm2d of a (frozen) teacher.

    After each teacher forward, ``hook.loss`` is the sum over those layers of
    ``bn_stat_loss(input, running_mean, running_var)`` for that forward (a 0-d tensor, or None
    before the first forward). ``with hook.paused():`` skips the computation for forwards that
    do not need it (the student step's teacher pass); ``remove()`` takes the hooks off.
    """

    def __init__(self, teacher: nn.Module, backend: str = "auto"):
        self.backend = backend
        self.enabled = True
        self._losses: list[torch.Tensor] = []
        bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            raise ValueError("BNStatHook: the teacher has no BatchNorm2d layer")
        self._handles = [teacher.register_forward_pre_hook(self._reset)]
        self._handles += [bn.register_forward_pre_hook(self._record) for bn in bns]

    def _reset(self, module, args) -> None:
        self._losses.clear()

    def _record(self, bn: nn.BatchNorm2d, args) -> None:
        if self.enabled:
            self._losses.append(bn_stat_loss(args[0], bn.running_mean, bn.running_var, backend=self.backend))

    @contextlib.contextmanager
    def paused(self):
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = True

    @property
    def loss(self) -> torch.Tensor | None:
        return torch.stack([l.float() for l in self._losses]).sum() if self._losses else None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
