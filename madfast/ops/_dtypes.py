"""The accumulation dtype every madfast op uses: fp64 for fp64 inputs, fp32 for everything else
(the Python twin of at::opmath_type in csrc/)."""

from __future__ import annotations

import torch

__all__ = ["acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
