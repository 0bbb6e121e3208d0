"""madfast.ops.ema_update_: validation, backend choice and torch.library registration.

The C++/CUDA op ``madfast::ema_update_`` is defined in csrc/ (schema in csrc/madfast.cpp);
its fake impl lives here. On those backends Python does O(1) work per call: the per-pair
checks run in C++. The Triton kernel is its own custom op: its launcher reads tensor
addresses into a table, which a traced (triton_op) body could not do, so it stays opaque to
torch.compile -- still one node, no graph break.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from madfast import _backend
from madfast.ops._register import register
from madfast.ops.ema.reference import torch_ema_update_

__all__ = ["ema_update_", "check_ema_args", "check_decay"]

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_decay(decay) -> None:
    """A float in [0, 1] or a 0-d floating tensor (whose value is not read: that could sync)."""
    if isinstance(decay, torch.Tensor):
        if decay.dim() != 0 or not decay.is_floating_point():
            raise ValueError(f"ema_update_: decay must be a float or a 0-d floating tensor, "
                             f"got shape {tuple(decay.shape)} and dtype {decay.dtype}")
    elif isinstance(decay, (float, int)) and not isinstance(decay, bool):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")
    else:
        raise TypeError(f"ema_update_: decay must be a float or a 0-d tensor, got {type(decay).__name__}")


def _check_call(ema_tensors, tensors, decay, seed) -> None:
    """The O(1) checks of every call."""
    if len(ema_tensors) != len(tensors):
        raise ValueError(f"ema_update_: ema_tensors and tensors must have the same length, "
                         f"got {len(ema_tensors)} and {len(tensors)}")
    check_decay(decay)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"ema_update_: stochastic_rounding_seed must be None or an int >= 0, got {seed!r}")


def check_ema_args(ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], decay) -> None:
    """Raises ValueError/TypeError naming the argument; runs before anything is modified (O(n),
    the Python twin of csrc/ema.h check_ema_args)."""
    _check_call(ema_tensors, tensors, decay, None)
    _check_pairs(ema_tensors, tensors, decay)


def _check_pairs(ema_tensors, tensors, decay) -> None:
    """The O(n) checks: decay's device and every pair."""
    if (isinstance(decay, torch.Tensor) and len(ema_tensors) and isinstance(ema_tensors[0], torch.Tensor)
            and decay.device.type != "cpu" and decay.device != ema_tensors[0].device):
        raise ValueError(f"ema_update_: decay must be on the CPU or on the tensors' device {ema_tensors[0].device}, "
                         f"got {decay.device}")
    for i, (e, p) in enumerate(zip(ema_tensors, tensors)):
        if not isinstance(e, torch.Tensor) or not isinstance(p, torch.Tensor):
            raise TypeError(f"ema_update_: ema_tensors[{i}] and tensors[{i}] must be tensors")
        if e.device != p.device:
            raise ValueError(f"ema_update_: device mismatch at index {i}: ema_tensors[{i}] is on {e.device}, "
                             f"tensors[{i}] on {p.device}")
        if e.shape != p.shape:
            raise ValueError(f"ema_update_: shape mismatch at index {i}: ema_tensors[{i}] has shape "
                             f"{tuple(e.shape)}, tensors[{i}] has shape {tuple(p.shape)}")
        if e.is_complex() or p.is_complex():
            raise _mixed_complex(i, e, p)
        if e.is_floating_point():
            if e.dtype not in _FLOATS or p.dtype not in _FLOATS:
                raise TypeError(f"ema_update_: ema_tensors[{i}] of dtype {e.dtype} cannot track tensors[{i}] of "
                                f"dtype {p.dtype} (supported: float64, float32, float16, bfloat16, in any "
                                f"combination)")
        elif e.dtype != p.dtype:
            raise TypeError(f"ema_update_: ema_tensors[{i}] has dtype {e.dtype}, which is copied, not averaged; "
                            f"tensors[{i}] must have the same dtype, got {p.dtype}")


def _mixed_complex(i: int, e: torch.Tensor, p: torch.Tensor) -> TypeError:
    return TypeError(f"ema_update_: ema_tensors[{i}] ({e.dtype}) and tensors[{i}] ({p.dtype}) must both be "
                     f"complex or both real")


def _any_complex(tensors) -> bool:
    try:
        return any(map(torch.is_complex, tensors))
    except TypeError:  # not all tensors: the checks name the culprit
        return False


def _as_real_pairs(ema_tensors, tensors) -> tuple[list, list]:
    """Complex pairs as their real (..., 2) views: a lerp with a real weight moves the real and
    imaginary parts alike, which is how torch.optim.swa_utils.AveragedModel averages complex
    parameters (``_foreach_lerp_``); the kernels then see real tensors only."""
    es, ps = [], []
    for i, (e, p) in enumerate(zip(ema_tensors, tensors)):
        if isinstance(e, torch.Tensor) and isinstance(p, torch.Tensor) and (e.is_complex() or p.is_complex()):
            if not (e.is_complex() and p.is_complex()):
                raise _mixed_complex(i, e, p)
            e, p = torch.view_as_real(e), torch.view_as_real(p)
        es.append(e)
        ps.append(p)
    return es, ps


def _fake_ema_update_(ema_tensors, tensors, decay, decay_value=0.0, sr_seed=-1, sr_step=0, host_table=None,
                      table=None) -> None:
    check_ema_args(ema_tensors, tensors, decay if decay is not None else decay_value)


if importlib.util.find_spec("triton") is not None:
    from madfast.ops.ema.triton_kernel import triton_ema_update_

    @torch.library.custom_op("madfast::ema_update_triton_", mutates_args=("ema_tensors",))
    def _ema_update_triton_op(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor],
                              weight: torch.Tensor) -> None:
        triton_ema_update_(ema_tensors, tensors, weight)


register("ema_update_", fake=_fake_ema_update_, backends=("cpp", "cuda"))
register("ema_update_", fake=check_ema_args, backends=("triton",))  # its weight, 1 − decay, checked as a decay


def compiled_ema_update_(ema_tensors, tensors, decay, seed: int | None, step: int, host_table=None,
                         table=None) -> None:
    """The C++/CUDA op; every per-pair check in C++. ``host_table``/``table``: a cached pointer table
    (see madfast.nn.ema._kernel)."""
    tensor = isinstance(decay, torch.Tensor)
    torch.ops.madfast.ema_update_(ema_tensors, tensors, decay if tensor else None, 0.0 if tensor else float(decay),
                                  -1 if seed is None else seed, step, host_table, table)


def ema_update_(ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor],
                decay: float | torch.Tensor, *, backend: str = "auto", stochastic_rounding_seed: int | None = None,
                stochastic_rounding_step: int = 0) -> None:
    """In place, for every pair: ``ema ← lerp(ema, tensor, 1 − decay)``, computed in fp32 (fp64 for an
    fp64 EMA) with ``1 − decay`` formed in double; decay 0 is an exact copy.

    Args:
        ema_tensors: tensors to update, any shapes; floating ones are averaged (any pair of float64,
            float32, float16, bfloat16: e.g. an fp32 EMA of a bf16 model), the others (e.g.
            ``num_batches_tracked``) are copied; complex ones are averaged as their real and
            imaginary parts (as AveragedModel does).
        tensors: the current values, same length and shapes as ``ema_tensors``, on their devices.
        decay: a float in [0, 1], or a 0-d floating tensor (on the tensors' device or the CPU) so
            that a schedule can change it with no host sync and no recompilation.
        backend: "auto", "torch", "triton", "cuda" or "cpp"; "auto" follows $MADFAST_BACKEND. The
            cpp/cuda kernels take one device per call (the first EMA tensor's).
        stochastic_rounding_seed: None (round to nearest), or a seed: fp16/bf16 EMAs are then rounded
            stochastically with random bits hashed from (seed, ``stochastic_rounding_step``, pair index,
            element index) -- reproducible, no generator state (cpp/cuda/torch backends).

    Costs one kernel launch per (ema dtype, tensor dtype) group on the fused backends, and O(1)
    Python work on the cpp/cuda ones.
    """
    seed, step = stochastic_rounding_seed, stochastic_rounding_step
    _check_call(ema_tensors, tensors, decay, seed)
    if len(ema_tensors) == 0:
        return
    first = ema_tensors[0]
    if not isinstance(first, torch.Tensor):
        raise TypeError("ema_update_: ema_tensors[0] and tensors[0] must be tensors")
    if _any_complex(ema_tensors) or _any_complex(tensors):
        ema_tensors, tensors = _as_real_pairs(ema_tensors, tensors)
    chosen = _backend.choose("ema_update_", backend, first.device)
    if chosen in ("cpp", "cuda"):
        compiled_ema_update_(ema_tensors, tensors, decay, seed, step)
        return
    ema_tensors, tensors = list(ema_tensors), list(tensors)
    _check_pairs(ema_tensors, tensors, decay)
    if chosen == "torch":
        torch_ema_update_(ema_tensors, tensors, decay, seed, step)
        return
    # the seed changes only fp16/bf16 EMAs (wider ones round to nearest on every backend)
    if seed is not None and any(e.dtype in (torch.float16, torch.bfloat16) for e in ema_tensors):
        raise NotImplementedError("ema_update_: stochastic rounding of fp16/bf16 EMAs is not implemented in the "
                                  "Triton kernel; use backend='cuda', 'cpp' or 'torch'")
    by_device: dict[torch.device, list[int]] = {}
    for i, e in enumerate(ema_tensors):
        by_device.setdefault(e.device, []).append(i)
    for device, idx in by_device.items():
        torch.ops.madfast.ema_update_triton_([ema_tensors[i] for i in idx], [tensors[i] for i in idx],
                                             _weight_tensor(decay, device))


def _weight_tensor(decay, device: torch.device) -> torch.Tensor:
    """1 − decay for the Triton kernel, formed in double, as an fp64 0-d tensor on ``device``."""
    if isinstance(decay, torch.Tensor):
        return 1 - decay.to(device=device, dtype=torch.float64)
    return torch.full((), 1.0 - decay, dtype=torch.float64, device=device)
