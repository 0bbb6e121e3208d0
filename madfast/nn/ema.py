"""FusedEMA: timm's ModelEmaV3 (1.0.31) semantics on the fused multi-tensor EMA op."""

from __future__ import annotations

import weakref
from copy import deepcopy
from typing import Callable

import torch
from torch import nn

from madfast.ops.ema import EmaPlan, ema_update_
from madfast.ops.ema.op import check_decay

__all__ = ["FusedEMA", "ema_multi_avg_fn"]

# Bumped whenever any module registers (assigns) a parameter, buffer or submodule: a FusedEMA's
# cached tensor lists are then collected again. Storage changes (.to(), .data =) need no bump:
# the C++ op sees them in the addresses it is given.
_GENERATION = [0]
_HOOKS: list = []


def _bump(*_):
    _GENERATION[0] += 1


def _watch_module_structure() -> None:
    if not _HOOKS:
        from torch.nn.modules import module

        _HOOKS.extend([module.register_module_parameter_registration_hook(_bump),
                       module.register_module_buffer_registration_hook(_bump),
                       module.register_module_module_registration_hook(_bump)])


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


class _ModelPlan:
    """The (EMA, model) tensor lists of one kind for one model, and their EmaPlan."""

    def __init__(self, ema: list[torch.Tensor], cur: list[torch.Tensor], model: nn.Module, backend: str):
        self.model = weakref.ref(model)
        self.generation = _GENERATION[0]
        self.ema, self.cur = ema, cur
        self.moves = any(e.device != c.device for e, c in zip(ema, cur))  # EMA kept on another device
        self.devices = (ema[0].device, cur[0].device) if ema else None
        self.plan = None if self.moves else EmaPlan(ema, cur, backend=backend)
        self.backend = backend

    def valid_for(self, model: nn.Module) -> bool:
        return (self.model() is model and self.generation == _GENERATION[0]
                and (not self.ema or (self.ema[0].device, self.cur[0].device) == self.devices))

    def update_(self, decay, seed, step) -> None:
        if self.plan is not None:
            self.plan.update_(decay, stochastic_rounding_seed=seed, stochastic_rounding_step=step)
        elif self.ema:
            cur = [c.to(e.device) for e, c in zip(self.ema, self.cur)]
            ema_update_(self.ema, cur, decay, backend=self.backend, stochastic_rounding_seed=seed,
                        stochastic_rounding_step=step)


class FusedEMA(nn.Module):
    """An exponential moving average of a model's parameters and buffers; a drop-in for
    ``timm.utils.ModelEmaV3`` of timm 1.0.31 (same arguments in the same order, ``.module``,
    ``update``, ``get_decay``, ``apply_update_``, ``apply_update_no_buffers_``, ``set``,
    ``forward`` and state_dict keys) whose update is one fused kernel per dtype group.

    As in ModelEmaV3: floating parameters and persistent floating buffers are averaged,
    integer buffers copied; with ``exclude_buffers`` every buffer is copied. ``device`` keeps
    the EMA elsewhere (e.g. "cpu"), ``dtype`` in another precision (e.g. fp32 for a bf16 model).
    ``get_decay(step)`` is 0 up to ``update_after_step + 1`` (an exact copy), then ``decay`` or,
    with ``use_warmup``, ``1 − (1 + t/warmup_gamma)^−warmup_power`` clamped to [min_decay, decay].
    With ``stochastic_rounding`` (default, as timm) bf16 EMA tensors -- and, unlike timm, which
    rounds them to nearest, fp16 ones -- are rounded stochastically, with random bits hashed from
    (``stochastic_rounding_seed``, update count, tensor, element): reproducible, identical on every
    rank (under torch.compile or CUDA-graph replay the count is fixed when traced/captured, so the
    bits repeat from update to update there). ``foreach`` is accepted for compatibility; the update is always fused.

    The lists of tensors are collected once per model and reused: Python work per update is O(1).
    They are collected again when a module anywhere assigns a parameter, buffer or submodule
    (torch's registration hooks); storage changes (``.to()``, ``.data =``) are seen by the op.
    ``del model.layer`` is not seen: make a new FusedEMA after removing modules.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_warmup: bool = False, warmup_gamma: float = 1.0,
                 warmup_power: float = 2 / 3, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, stochastic_rounding: bool = True,
                 stochastic_rounding_seed: int = 0, foreach: bool = True, exclude_buffers: bool = False,
                 *, backend: str = "auto"):
        super().__init__()
        _check_unit_interval("decay", decay)
        _check_unit_interval("min_decay", min_decay)
        if warmup_gamma <= 0:
            raise ValueError(f"warmup_gamma must be > 0, got {warmup_gamma}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
        if not isinstance(stochastic_rounding_seed, int) or not 0 <= stochastic_rounding_seed < 2**63:
            raise ValueError(f"stochastic_rounding_seed must be an int in [0, 2^63), got {stochastic_rounding_seed!r}")
        for name, p in model.named_parameters():
            if p.is_complex():
                raise TypeError(f"FusedEMA: parameter {name!r} is complex ({p.dtype}); complex EMAs are not supported")
        self.module = deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.foreach = foreach
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.stochastic_rounding = stochastic_rounding
        self.stochastic_rounding_seed = stochastic_rounding_seed
        self.exclude_buffers = exclude_buffers
        self.backend = backend
        if self.device is not None:
            self.module.to(device=self.device)
        if self.dtype is not None:
            self.module.to(dtype=self.dtype)
        # Which buffers state_dict() holds (and ModelEmaV3 therefore averages).
        non_persistent = {f"{prefix}.{b}" if prefix else b
                          for prefix, m in self.module.named_modules() for b in m._non_persistent_buffers_set}
        self._persistent = [name not in non_persistent for name, _ in self.module.named_buffers()]
        self._updates = [0]  # stochastic rounding's step counter
        self._plans: dict = {}
        _watch_module_structure()

    # Plans hold weak references and tensor lists: never copied or pickled with the module.
    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_plans"] = {}
        return state

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

    def _collect(self, model: nn.Module, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """kind "state": parameters and persistent buffers; "params"; "buffers": every buffer."""
        ema, cur = [], []
        if kind != "buffers":
            ema, cur = list(self.module.parameters()), list(model.parameters())
        if kind == "state":
            ema += [b for b, keep in zip(self.module.buffers(), self._persistent) if keep]
            cur += [b for b, keep in zip(model.buffers(), self._persistent) if keep]
        elif kind == "buffers":
            ema, cur = list(self.module.buffers()), list(model.buffers())
        if len(ema) != len(cur):
            raise ValueError(f"model has {len(cur)} parameters/buffers to average, the EMA has {len(ema)}: "
                             "pass the model the EMA was made from")
        return ema, cur  # the Parameters themselves: `.data =` (as .to() does) stays visible

    def _apply_kind(self, model: nn.Module, kind: str, decay: float | torch.Tensor) -> None:
        seed = self.stochastic_rounding_seed if self.stochastic_rounding else None
        if torch.compiler.is_compiling():  # the traced graph holds no Python work to save
            # (the step counter is not traced: it would recompile every step; the bits repeat)
            ema, cur = self._collect(model, kind)
            cur = [c.detach().to(self.device) if self.device is not None else c.detach() for c in cur]
            ema_update_(ema, cur, decay, backend=self.backend, stochastic_rounding_seed=seed)
            return
        key = (id(model), kind)
        plan = self._plans.get(key)
        if plan is None or not plan.valid_for(model):
            plan = self._plans[key] = _ModelPlan(*self._collect(model, kind), model, self.backend)
        plan.update_(decay, seed, self._updates[0])

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Moves the EMA toward ``model`` with ``get_decay(step)``."""
        decay = self.get_decay(step)
        (self._update_no_buffers if self.exclude_buffers else self._update)(model, decay)

    @torch.no_grad()
    def apply_update_(self, model: nn.Module, decay: float | torch.Tensor) -> None:
        """Averages parameters and persistent buffers with ``decay`` (integer buffers copied)."""
        self._update(model, decay)

    @torch.no_grad()
    def apply_update_no_buffers_(self, model: nn.Module, decay: float | torch.Tensor) -> None:
        """Averages parameters with ``decay`` and copies every buffer."""
        self._update_no_buffers(model, decay)

    # (undecorated: update() is already under no_grad, and each context manager costs µs per call)
    def _update(self, model: nn.Module, decay) -> None:
        check_decay(decay)
        self._apply_kind(model, "state", decay)
        self._count_update()

    def _update_no_buffers(self, model: nn.Module, decay) -> None:
        check_decay(decay)
        self._apply_kind(model, "params", decay)
        self._apply_kind(model, "buffers", 0.0)
        self._count_update()

    @property
    def stochastic_rounding_step(self) -> int:
        """Updates so far: with the seed, it picks stochastic rounding's random bits. Not in
        state_dict() (whose keys stay timm's ModelEmaV3's): save it beside the state dict and set it
        back on resume, or a resumed bf16/fp16 EMA repeats the bits of the first updates."""
        return self._updates[0]

    @stochastic_rounding_step.setter
    def stochastic_rounding_step(self, step: int) -> None:
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"stochastic_rounding_step must be an int ≥ 0, got {step!r}")
        self._updates[0] = step

    def _count_update(self) -> None:
        if not torch.compiler.is_compiling():
            self._updates[0] += 1  # a list: no nn.Module.__setattr__ per update

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copies ``model``'s parameters and persistent buffers into the EMA (exactly, as copy_)."""
        self._apply_kind(model, "state", 0.0)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def ema_multi_avg_fn(decay: float = 0.999, *, backend: str = "auto") -> Callable:
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` running the fused EMA op::

        AveragedModel(model, multi_avg_fn=madfast.ema_multi_avg_fn(0.999), use_buffers=True)

    AveragedModel passes fresh lists (one per device and dtype) each call; a cached pointer table
    per such group is kept, and the C++ op rebuilds it only when a tensor's storage changed.
    """
    check_decay(decay)
    tables: dict = {}

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        if not averaged or torch.compiler.is_compiling():
            ema_update_(averaged, current, decay, backend=backend)
            return
        first = averaged[0]
        key = (first.device, first.dtype, current[0].dtype if current else None, len(averaged))
        plan = tables.get(key)
        if plan is None:
            plan = tables[key] = _TablePlan(first.device, backend)
        plan.update_(averaged, current, decay)

    return update


class _TablePlan:
    """A cached pointer table for lists that are rebuilt by the caller on every call."""

    def __init__(self, device: torch.device, backend: str):
        from madfast import _backend

        self.backend = _backend.choose("ema_update_", backend, device)
        self.tables = (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64, device=device)) \
            if self.backend == "cuda" else (None, None)

    def update_(self, averaged, current, decay) -> None:
        if self.backend in ("cpp", "cuda"):
            from madfast.ops.ema.op import compiled_ema_update_

            compiled_ema_update_(averaged, current, decay, None, 0, *self.tables)
        else:
            ema_update_(averaged, current, decay, backend=self.backend)
