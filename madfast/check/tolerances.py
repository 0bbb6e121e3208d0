"""The tolerance rule `madfast check` and the test suite both apply (flash-attention's): a kernel's
relative error against an fp64 eager result may be at most FORWARD_FACTOR (outputs) or
GRADIENT_FACTOR (gradients) times the error of eager PyTorch run in the kernel's dtype, and never
less than the floor of that dtype."""

from __future__ import annotations

import math

import torch

__all__ = ["FLOORS", "FORWARD_FACTOR", "GRADIENT_FACTOR", "rel_err", "floor", "tolerance"]

FLOORS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FORWARD_FACTOR, GRADIENT_FACTOR = 2.0, 3.0


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|, in fp64; inf when the shapes differ."""
    if expected.numel() == 0:
        return 0.0 if actual.numel() == 0 else math.inf
    if actual.shape != expected.shape:
        return math.inf
    diff = (actual.double() - expected.double()).abs().max()
    return (diff / expected.double().abs().max().clamp_min(1e-30)).item()


def floor(dtype: torch.dtype, device: torch.device, convolution: bool = False) -> float:
    """The smallest tolerance in ``dtype``. An fp32 convolution on a GPU with
    torch.backends.cudnn.allow_tf32 on (PyTorch's default) is TF32 arithmetic, fp16's 10-bit mantissa,
    in whichever algorithm cuDNN picks for the shape: eager may get an fp32 algorithm (error 1e-7)
    where the fused path's channels-last call gets TF32 (2e-4), so eager's error bounds nothing there."""
    if convolution and dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return FLOORS[torch.float16]
    return FLOORS[dtype]


def tolerance(expected: torch.Tensor, eager_same_dtype: torch.Tensor, factor: float, floor_: float) -> float:
    """The largest error allowed: ``factor`` × eager's own error in the same dtype, at least ``floor_``."""
    return max(factor * rel_err(eager_same_dtype, expected), floor_)
