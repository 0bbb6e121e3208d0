"""What the Triton launchers share: torch → Triton dtypes, and whether kernels run interpreted."""

from __future__ import annotations

import os

import torch
import triton.language as tl

__all__ = ["TL_DTYPES", "interpreted"]

TL_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.float16: tl.float16,
             torch.bfloat16: tl.bfloat16}


def interpreted() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, CI)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
