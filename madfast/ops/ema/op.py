"""madfast.ops.ema_update_: validation, backend choice and torch.library registration.

The C++/CUDA op ``madfast::ema_update_`` is defined in csrc/ (schema in csrc/madfast.cpp);
its fake impl lives here. The Triton kernel is its own custom op: its launcher reads tensor
addresses into a table, which a traced (triton_op) body could not do, so it stays opaque to
torch.compile -- still one node, no graph break.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from madfast import _backend
from madfast.ops.ema.reference import torch_ema_update_

__all__ = ["ema_update_", "check_ema_args"]

_SUPPORTED_PAIRS = {(d, d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)} | {
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16)}


def check_ema_args(ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], decay) -> None:
    """Raises ValueError/TypeError naming the argument; runs before anything is modified."""
    if len(ema_tensors) != len(tensors):
        raise ValueError(f"ema_update_: ema_tensors and tensors must have the same length, "
                         f"got {len(ema_tensors)} and {len(tensors)}")
    if isinstance(decay, torch.Tensor):
        if decay.dim() != 0 or not decay.is_floating_point():
            raise ValueError(f"ema_update_: decay must be a float or a 0-d floating tensor, "
                             f"got shape {tuple(decay.shape)} and dtype {decay.dtype}")
        # A device tensor's value is not checked here: that would cost a host sync.
    elif isinstance(decay, (float, int)) and not isinstance(decay, bool):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")
    else:
        raise TypeError(f"ema_update_: decay must be a float or a 0-d tensor, got {type(decay).__name__}")
    for i, (e, p) in enumerate(zip(ema_tensors, tensors)):
        if not isinstance(e, torch.Tensor) or not isinstance(p, torch.Tensor):
            raise TypeError(f"ema_update_: ema_tensors[{i}] and tensors[{i}] must be tensors")
        if e.device != p.device:
            raise ValueError(f"ema_update_: device mismatch at index {i}: ema_tensors[{i}] is on {e.device}, "
                             f"tensors[{i}] on {p.device}")
        if e.shape != p.shape:
            raise ValueError(f"ema_update_: shape mismatch at index {i}: ema_tensors[{i}] has shape "
                             f"{tuple(e.shape)}, tensors[{i}] has shape {tuple(p.shape)}")
        if e.is_floating_point():
            if (e.dtype, p.dtype) not in _SUPPORTED_PAIRS:
                raise TypeError(f"ema_update_: ema_tensors[{i}] of dtype {e.dtype} cannot track tensors[{i}] of "
                                f"dtype {p.dtype} (supported: equal floating dtypes, or a float32 EMA of "
                                f"float16/bfloat16)")
        elif e.dtype != p.dtype:
            raise TypeError(f"ema_update_: ema_tensors[{i}] has dtype {e.dtype}, which is copied, not averaged; "
                            f"tensors[{i}] must have the same dtype, got {p.dtype}")


def _fake_ema_update_(ema_tensors, tensors, decay) -> None:
    check_ema_args(ema_tensors, tensors, decay)


if _backend.has_kernel("ema_update_", "CPU") or _backend.has_kernel("ema_update_", "CUDA"):
    torch.library.register_fake("madfast::ema_update_")(_fake_ema_update_)

_HAS_TRITON = importlib.util.find_spec("triton") is not None
if _HAS_TRITON:
    from madfast.ops.ema.triton_kernel import triton_ema_update_

    @torch.library.custom_op("madfast::ema_update_triton_", mutates_args=("ema_tensors",))
    def _ema_update_triton_op(ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor],
                              decay: torch.Tensor) -> None:
        triton_ema_update_(ema_tensors, tensors, decay)

    _ema_update_triton_op.register_fake(_fake_ema_update_)


def _run(backend: str, ema_tensors: list[torch.Tensor], tensors: list[torch.Tensor], decay: torch.Tensor) -> None:
    if backend == "torch":
        torch_ema_update_(ema_tensors, tensors, decay)
    elif backend == "triton":
        torch.ops.madfast.ema_update_triton_(ema_tensors, tensors, decay)
    else:  # "cpp" and "cuda" are the CPU and CUDA kernels of one dispatcher op
        torch.ops.madfast.ema_update_(ema_tensors, tensors, decay)


def ema_update_(ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor],
                decay: float | torch.Tensor, *, backend: str = "auto") -> None:
    """In place, for every pair: ``ema ← ema + (1 − decay)·(tensor − ema)``, computed in fp32.

    Args:
        ema_tensors: tensors to update, any shapes; floating ones are averaged (an fp32 EMA of
            fp16/bf16 tensors is allowed), the others (e.g. ``num_batches_tracked``) are copied.
        tensors: the current values, same length, shapes and devices as ``ema_tensors``.
        decay: a float in [0, 1], or a 0-d floating tensor (on the tensors' device or the CPU) so
            that a schedule can change it with no host sync and no recompilation.
        backend: "auto", "torch", "triton", "cuda" or "cpp"; "auto" follows $MADFAST_BACKEND.

    Costs one kernel launch per (device, ema dtype, tensor dtype) group on the fused backends.
    """
    ema_tensors, tensors = list(ema_tensors), list(tensors)
    check_ema_args(ema_tensors, tensors, decay)
    by_device: dict[torch.device, list[int]] = {}
    for i, e in enumerate(ema_tensors):
        by_device.setdefault(e.device, []).append(i)
    for device, idx in by_device.items():
        chosen = _backend.choose("ema_update_", backend, device)
        # fp32 unless an fp64 EMA needs the full value of decay
        dtype = torch.float64 if any(ema_tensors[i].dtype == torch.float64 for i in idx) else torch.float32
        if isinstance(decay, torch.Tensor):
            d = decay.to(device=device, dtype=dtype)
        else:  # a fill kernel, not a host-to-device copy
            d = torch.full((), decay, dtype=dtype, device=device)
        _run(chosen, [ema_tensors[i] for i in idx], [tensors[i] for i in idx], d)
