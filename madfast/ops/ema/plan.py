"""EmaPlan: the pairs of an EMA validated once, and (CUDA) a device-resident pointer table.

Each ``update_`` is then O(1) Python work and one launch per dtype group: the decay goes to the
kernel as an argument (float) or is read from a device scalar, and the C++ host code rebuilds the
table in place only when a tensor's storage, size or dtype changed -- so a steady-state update
allocates nothing and copies nothing to the device, and can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from madfast import _backend
from madfast.ops.ema.op import check_decay, check_ema_args, compiled_ema_update_, ema_update_

__all__ = ["EmaPlan"]


class EmaPlan:
    """``update_(decay)`` ≡ ``ema_update_(ema_tensors, tensors, decay)``, for lists that stay the same."""

    def __init__(self, ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], *,
                 backend: str = "auto"):
        self.ema_tensors, self.tensors = list(ema_tensors), list(tensors)
        check_ema_args(self.ema_tensors, self.tensors, 0.0)
        # the fused kernels take one device per call: one sub-list per device (usually one)
        by_device: dict[torch.device, list[int]] = {}
        for i, e in enumerate(self.ema_tensors):
            by_device.setdefault(e.device, []).append(i)
        self._parts = []
        for device, idx in by_device.items():
            chosen = _backend.choose("ema_update_", backend, device)
            ema = [self.ema_tensors[i] for i in idx] if len(by_device) > 1 else self.ema_tensors
            cur = [self.tensors[i] for i in idx] if len(by_device) > 1 else self.tensors
            tables = (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64, device=device)) \
                if chosen == "cuda" else (None, None)
            self._parts.append((chosen, ema, cur, tables))

    def update_(self, decay: float | torch.Tensor, *, stochastic_rounding_seed: int | None = None,
                stochastic_rounding_step: int = 0) -> None:
        """One EMA step of every pair (see ``madfast.ops.ema_update_``)."""
        check_decay(decay)
        for backend, ema, cur, (host_table, table) in self._parts:
            if backend in ("cpp", "cuda"):
                compiled_ema_update_(ema, cur, decay, stochastic_rounding_seed, stochastic_rounding_step,
                                     host_table, table)
            else:
                ema_update_(ema, cur, decay, backend=backend, stochastic_rounding_seed=stochastic_rounding_seed,
                            stochastic_rounding_step=stochastic_rounding_step)
