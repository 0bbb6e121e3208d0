"""Loss modules over madfast's fused loss ops."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from madfast.ops import adversarial_loss, kl_div
from madfast.ops.bn_stats import bn_stat_losses

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
    ``bn_stat_loss(input, running_mean, running_var)`` for that forward (a 0-d fp32 tensor, fp64 for
    fp64 inputs, or None before the first forward). The forward only keeps each layer's input (it
    is alive for backward anyway); reading ``hook.loss`` computes every layer at once (one op on the
    C++ backend) against the running statistics as they are then — the teacher is frozen.
    ``with hook.paused():`` skips forwards that do not need it (the student step's teacher pass);
    ``remove()`` takes the hooks off.
    """

    def __init__(self, teacher: nn.Module, backend: str = "auto"):
        self.backend = backend
        self.enabled = True
        self._inputs: list[tuple[torch.Tensor, nn.BatchNorm2d]] = []  # deferred to hook.loss
        self._losses: list[torch.Tensor] = []  # computed in the forward (subclasses: GlobalBNStatHook)
        self._loss: tuple[tuple[int, int], torch.Tensor] | None = None  # (what it covers, the sum)
        bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        if not bns:
            raise ValueError("BNStatHook: the teacher has no BatchNorm2d layer")
        self._handles = [teacher.register_forward_pre_hook(self._reset)]
        self._handles += [bn.register_forward_pre_hook(self._record) for bn in bns]

    def _reset(self, module, args) -> None:
        self._inputs.clear()
        self._losses.clear()
        self._loss = None

    def _record(self, bn: nn.BatchNorm2d, args) -> None:
        if self.enabled:
            self._inputs.append((args[0], bn))

    @contextlib.contextmanager
    def paused(self):
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = True

    @property
    def loss(self) -> torch.Tensor | None:
        covers = (len(self._inputs), len(self._losses))
        if self._loss is None or self._loss[0] != covers:
            parts = list(self._losses)
            devices: dict[torch.device, list] = {}  # one call per device
            for x, bn in self._inputs:
                devices.setdefault(x.device, []).append((x, bn))
            parts += [bn_stat_losses([x for x, _ in g], [bn.running_mean for _, bn in g],
                                     [bn.running_var for _, bn in g], backend=self.backend) for g in devices.values()]
            if not parts:
                return None
            self._loss = (covers, parts[0] if len(parts) == 1 else torch.stack([p.float() for p in parts]).sum())
        return self._loss[1]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
