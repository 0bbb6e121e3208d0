"""The memory layout the 4-D kernels read in place and write: channels_last when the input is
channels_last (and not also contiguous, as size-1 dimensions allow), contiguous otherwise (any
other layout is copied first). The Python twin of layout_of / ChannelView in csrc/."""

from __future__ import annotations

import torch

__all__ = ["kernel_memory_format"]


def kernel_memory_format(x: torch.Tensor) -> torch.memory_format:
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format
