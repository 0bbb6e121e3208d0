"""FusedEMA: timm's ModelEmaV3 semantics on the fused multi-tensor EMA op."""

from __future__ import annotations

from copy import deepcopy
from typing import Callable

import torch
from torch import nn

from madfast.ops.ema import check_ema_args, ema_update_

__all__ = ["FusedEMA", "ema_multi_avg_fn"]


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


class FusedEMA(nn.Module):
    """An exponential moving average of a model's parameters and buffers; a drop-in for
    ``timm.utils.ModelEmaV3`` (same arguments, ``.module``, ``update``, ``get_decay``, ``set``,
    ``forward`` and state_dict keys) whose update is one fused kernel per dtype group.

    As in ModelEmaV3: floating parameters and persistent floating buffers are averaged,
    integer buffers copied; with ``exclude_buffers`` every buffer is copied. ``device`` keeps
    the EMA elsewhere (e.g. "cpu"). ``get_decay(step)`` is 0 up to ``update_after_step + 1``,
    then ``decay`` or, with ``use_warmup``, ``1 − (1 + t/warmup_gamma)^−warmup_power``
    clamped to [min_decay, decay].
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_warmup: bool = False, warmup_gamma: float = 1.0,
                 warmup_power: float = 2 / 3, exclude_buffers: bool = False,
                 device: torch.device | str | None = None, backend: str = "auto"):
        super().__init__()
        _check_unit_interval("decay", decay)
        _check_unit_interval("min_decay", min_decay)
        if warmup_gamma <= 0:
            raise ValueError(f"warmup_gamma must be > 0, got {warmup_gamma}")
        self.module = deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.exclude_buffers = exclude_buffers
        self.device = torch.device(device) if device is not None else None
        self.backend = backend
        if self.device is not None:
            self.module.to(device=self.device)
        # Which buffers state_dict() holds (and ModelEmaV3 therefore averages).
        non_persistent = {f"{prefix}.{b}" if prefix else b
                          for prefix, m in self.module.named_modules() for b in m._non_persistent_buffers_set}
        self._persistent = [name not in non_persistent for name, _ in self.module.named_buffers()]

    def get_decay(self, step: int | None = None) -> float:
        """The decay used at ``step`` (``self.decay`` when step is None)."""
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
        return max(min(decay, self.decay), self.min_decay)

    def _pairs(self, model: nn.Module, with_buffers: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema = list(self.module.parameters())
        cur = [p.detach() for p in model.parameters()]
        if with_buffers:
            ema += [b for b, keep in zip(self.module.buffers(), self._persistent) if keep]
            cur += [b for b, keep in zip(model.buffers(), self._persistent) if keep]
        if len(ema) != len(cur):
            raise ValueError(f"model has {len(cur)} parameters/buffers to average, the EMA has {len(ema)}: "
                             "pass the model the EMA was made from")
        if self.device is not None:
            cur = [t.to(self.device) for t in cur]
        return ema, cur

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Moves the EMA toward ``model`` with ``get_decay(step)``."""
        ema, cur = self._pairs(model, with_buffers=not self.exclude_buffers)
        ema_update_(ema, cur, self.get_decay(step), backend=self.backend)
        if self.exclude_buffers:
            ema_b, cur_b = list(self.module.buffers()), [b.to(self.device) if self.device else b
                                                        for b in model.buffers()]
            if ema_b:
                torch._foreach_copy_(ema_b, cur_b)

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copies ``model``'s parameters and buffers into the EMA."""
        ema, cur = self._pairs(model, with_buffers=True)
        ema_update_(ema, cur, 0.0, backend=self.backend)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def ema_multi_avg_fn(decay: float = 0.999, *, backend: str = "auto") -> Callable:
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` running the fused EMA op::

        AveragedModel(model, multi_avg_fn=madfast.ema_multi_avg_fn(0.999), use_buffers=True)
    """
    check_ema_args([], [], decay)

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        ema_update_(averaged, current, decay, backend=backend)

    return update
