"""Argument checks shared by the ops: each raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import torch

__all__ = ["check_floating", "check_same", "check_devices", "check_positive", "check_choice"]


def check_floating(op: str, name: str, t: torch.Tensor, ndim: int | tuple[int, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got dtype {t.dtype}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{op}: {name} must be {' or '.join(f'{d}-D' for d in dims)}, got shape {tuple(t.shape)}")


def check_same(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *,
               shape: bool = True, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def check_devices(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Every given tensor (None skipped) on ref's device. Fake kernels check it too: the dispatcher
    hands them any call with a meta tensor beside real ones, and they must not return garbage."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def check_positive(op: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value}")


def check_choice(op: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}")
