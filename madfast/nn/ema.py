"""FusedEMA: timm's ModelEmaV3 (1.0.31) semantics on the fused multi-tensor EMA op."""

from __future__ import annotations

import weakref
from copy import deepcopy
from functools import partial
from operator import getitem, is_
from typing import Callable

import torch
from torch import nn

from madfast import _backend
from madfast.ops.ema.op import check_decay, compiled_ema_update_, ema_update_

__all__ = ["FusedEMA", "ema_multi_avg_fn"]


def _match(what: str, ema_named, model_named) -> tuple[list, list, list]:
    """(names, EMA tensors, model tensors), paired by position; ValueError/TypeError naming the
    tensor when the two do not pair up. A name may differ by a wrapper's prefix (DDP's ``module.``,
    torch.compile's ``_orig_mod.``), as ModelEmaV3 pairs by position."""
    ema_named, model_named = list(ema_named), list(model_named)
    if len(ema_named) != len(model_named):
        raise ValueError(f"FusedEMA: the model has {len(model_named)} {what}s, the EMA {len(ema_named)}: "
                         "pass the model the EMA was made from")
    for (name, e), (model_name, c) in zip(ema_named, model_named):
        if not (name == model_name or model_name.endswith("." + name) or name.endswith("." + model_name)):
            raise ValueError(f"FusedEMA: the model's {what} {model_name!r} is paired with the EMA's {name!r}: "
                             "pass the model the EMA was made from")
        if e.shape != c.shape:
            raise ValueError(f"FusedEMA: {what} {model_name!r} has shape {tuple(c.shape)} in the model and "
                             f"{tuple(e.shape)} in the EMA: pass the model the EMA was made from")
        if e.is_floating_point() != c.is_floating_point() or (not e.is_floating_point() and e.dtype != c.dtype):
            raise TypeError(f"FusedEMA: {what} {model_name!r} is {c.dtype} in the model and {e.dtype} in the EMA: "
                            "floating tensors are averaged, the others copied, so both must be of the same kind")
    return [n for n, _ in ema_named], [e for _, e in ema_named], [c for _, c in model_named]


def _pairs(ema: nn.Module, model: nn.Module) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The (EMA, model) tensor lists of each kind: "state" (parameters and persistent buffers: what
    ModelEmaV3 averages), "params", "buffers" (every buffer). The Parameters themselves, so that
    ``.data =`` (as ``.to()`` does) stays visible."""
    _, ema_p, cur_p = _match("parameter", ema.named_parameters(), model.named_parameters())
    names, ema_b, cur_b = _match("buffer", ema.named_buffers(), model.named_buffers())
    non_persistent = {f"{prefix}.{b}" if prefix else b
                      for prefix, m in ema.named_modules() for b in m._non_persistent_buffers_set}
    keep = [name not in non_persistent for name in names]
    return {"state": (ema_p + [b for b, k in zip(ema_b, keep) if k], cur_p + [b for b, k in zip(cur_b, keep) if k]),
            "params": (ema_p, cur_p), "buffers": (ema_b, cur_b)}


def _run_op(ema, cur, decay, seed, step, *, backend: str) -> None:
    ema_update_(ema, cur, decay, backend=backend, stochastic_rounding_seed=seed, stochastic_rounding_step=step)


def _kernel(backend: str, device: torch.device) -> Callable:
    """``kernel(ema, cur, decay, seed, step)`` for lists on ``device``: the chosen backend and, on
    CUDA, its own pointer table, which the C++ op rewrites only when a row (a tensor's storage,
    size or dtype) changed, so a steady-state update allocates and copies nothing to the device."""
    chosen = _backend.choose("ema_update_", backend, device)
    if chosen == "cuda":
        return partial(compiled_ema_update_, host_table=torch.empty(0, dtype=torch.int64),
                       table=torch.empty(0, dtype=torch.int64, device=device))
    if chosen == "cpp":
        return compiled_ema_update_
    return partial(_run_op, backend=chosen)


def _parts(ema: list[torch.Tensor], cur: list[torch.Tensor], backend: str) -> list[tuple]:
    """(kernel, ema, cur) per device of the EMA: the fused kernels take one device per call."""
    if any(e.device != c.device for e, c in zip(ema, cur)):  # the model's tensors are copied over first
        return [(lambda ema, cur, *args: _run_op(ema, [c.to(e.device) for e, c in zip(ema, cur)], *args,
                                                 backend=backend), ema, cur)]
    if any(e.is_complex() for e in ema):  # through the op's Python entry, which takes real views per call
        complex_ = [i for i, e in enumerate(ema) if e.is_complex()]
        real = [i for i, e in enumerate(ema) if not e.is_complex()]
        return ([(partial(_run_op, backend=backend), [ema[i] for i in complex_], [cur[i] for i in complex_])]
                + _parts([ema[i] for i in real], [cur[i] for i in real], backend))
    by_device: dict[torch.device, tuple[list, list]] = {}
    for e, c in zip(ema, cur):
        es, cs = by_device.setdefault(e.device, ([], []))
        es.append(e)
        cs.append(c)
    return [(_kernel(backend, device), es, cs) for device, (es, cs) in by_device.items()]


class _Plan:
    """What updating an EMA module toward one model takes, validated once: the tensor lists of each
    kind (see ``_pairs``) split into kernel calls, and the slots they came from -- every entry of
    every module's ``_parameters``, ``_buffers`` and ``_modules`` in both trees. The plan holds while
    each slot still holds the same object (O(#tensors + #modules), C-level) and the first pair
    is on the same devices; storage changes (``.to()``, ``.data =``) are seen by the op itself."""

    def __init__(self, ema: nn.Module, model: nn.Module, backend: str):
        pairs = _pairs(ema, model)
        self.ema, self.model = ema, weakref.ref(model)
        slots = [(d, k) for root in (ema, model) for m in root.modules()
                 for d in (m._parameters, m._buffers, m._modules) for k in d]
        self.dicts, self.keys = [d for d, _ in slots], [k for _, k in slots]
        self.values = [d[k] for d, k in slots]  # held, so a replaced object is never freed and its address reused
        state = pairs["state"]
        self.first = (state[0][0], state[1][0]) if state[0] else None
        self.devices = (self.first[0].device, self.first[1].device) if self.first else None
        self.calls = {kind: _parts(e, c, backend) for kind, (e, c) in pairs.items()}

    def valid_for(self, ema: nn.Module, model: nn.Module) -> bool:
        if self.ema is not ema or self.model() is not model:
            return False
        try:
            if not all(map(is_, map(getitem, self.dicts, self.keys), self.values)):
                return False
        except KeyError:  # a parameter, buffer or submodule was deleted
            return False
        return self.first is None or (self.first[0].device, self.first[1].device) == self.devices


class FusedEMA(nn.Module):
    """An exponential moving average of a model's parameters and buffers; a drop-in for
    ``timm.utils.ModelEmaV3`` of timm 1.0.31 (same arguments in the same order, ``.module``,
    ``update``, ``get_decay``, ``apply_update_``, ``apply_update_no_buffers_``, ``set``,
    ``forward`` and state_dict keys) whose update is one fused kernel per dtype group.

    As in ModelEmaV3: floating parameters and persistent floating buffers are averaged,
    integer buffers copied; with ``exclude_buffers`` every buffer is copied. Complex ones are
    averaged as AveragedModel does (ModelEmaV3 copies them). With rounding to nearest the bits
    are ModelEmaV3's (the same fused lerp) in fp32, fp16 and bf16. ``device`` keeps
    the EMA elsewhere (e.g. "cpu"), ``dtype`` in another precision (e.g. fp32 for a bf16 model).
    ``get_decay(step)`` is 0 up to ``update_after_step + 1`` (an exact copy), then ``decay`` or,
    with ``use_warmup``, ``1 − (1 + t/warmup_gamma)^−warmup_power`` clamped to [min_decay, decay].
    With ``stochastic_rounding`` (default, as timm) bf16 EMA tensors -- and, unlike timm, which
    rounds them to nearest, fp16 ones -- are rounded stochastically, with random bits hashed from
    (``stochastic_rounding_seed``, update count, tensor, element): reproducible, identical on every
    rank (under torch.compile or CUDA-graph replay the count is fixed when traced/captured, so the
    bits repeat from update to update there). ``foreach`` is accepted for compatibility; the update is always fused.

    The tensor lists are collected and checked once per model (the plan) and reused while every
    parameter, buffer and submodule slot of the model and the EMA holds the same object; replacing
    or deleting one rebuilds the plan. Adding one to a module is not seen: make a new FusedEMA then.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_warmup: bool = False, warmup_gamma: float = 1.0,
                 warmup_power: float = 2 / 3, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, stochastic_rounding: bool = True,
                 stochastic_rounding_seed: int = 0, foreach: bool = True, exclude_buffers: bool = False,
                 *, backend: str = "auto"):
        super().__init__()
        for name, value in (("decay", decay), ("min_decay", min_decay)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if warmup_gamma <= 0:
            raise ValueError(f"warmup_gamma must be > 0, got {warmup_gamma}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
        if not isinstance(stochastic_rounding_seed, int) or not 0 <= stochastic_rounding_seed < 2**63:
            raise ValueError(f"stochastic_rounding_seed must be an int in [0, 2^63), got {stochastic_rounding_seed!r}")
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
        if device is not None or dtype is not None:
            self.module.to(device=self.device, dtype=dtype)
        self._updates = [0]  # stochastic rounding's step counter; a list: no nn.Module.__setattr__ per update
        self._plan: _Plan | None = None

    # The plan holds a weak reference and the model's tensors: never copied or pickled with the module.
    def __getstate__(self):
        state = super().__getstate__()
        state["_plan"] = None
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

    def _apply_kind(self, model: nn.Module, kind: str, decay: float | torch.Tensor) -> None:
        seed = self.stochastic_rounding_seed if self.stochastic_rounding else None
        if torch.compiler.is_compiling():  # the traced graph holds no Python work to save
            # (the step counter is not traced: it would recompile every step; the bits repeat)
            ema, cur = _pairs(self.module, model)[kind]
            cur = [c.detach().to(self.device) for c in cur]
            ema_update_(ema, cur, decay, backend=self.backend, stochastic_rounding_seed=seed)
            return
        plan = self._plan
        if plan is None or not plan.valid_for(self.module, model):
            plan = self._plan = _Plan(self.module, model, self.backend)
        step = self._updates[0]
        for kernel, ema, cur in plan.calls[kind]:
            kernel(ema, cur, decay, seed, step)

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
            self._updates[0] += 1

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copies ``model``'s parameters and persistent buffers into the EMA (exactly, as copy_)."""
        self._apply_kind(model, "state", 0.0)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def ema_multi_avg_fn(decay: float = 0.999, *, backend: str = "auto") -> Callable:
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` running the fused EMA op::

        AveragedModel(model, multi_avg_fn=madfast.ema_multi_avg_fn(0.999), use_buffers=True)

    AveragedModel passes fresh lists (one per device and dtype) each call; one kernel (with its
    CUDA pointer table, see ``_kernel``) is kept per such group.
    """
    check_decay(decay)
    kernels: dict = {}

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        if not averaged or torch.compiler.is_compiling():
            ema_update_(averaged, current, decay, backend=backend)
            return
        first = averaged[0]
        key = (first.device, first.dtype, current[0].dtype if current else None, len(averaged))
        kernel = kernels.get(key)
        if kernel is None:
            kernel = kernels[key] = (_kernel(backend, first.device) if not first.is_complex()
                                     else partial(_run_op, backend=backend))  # real views taken per call
        kernel(averaged, current, decay, None, 0)

    return update
