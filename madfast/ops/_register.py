"""One way to register the compiled kernels of an op in madfast._backend.OPS with torch.library:
the fake (meta) kernels of its forward and backward entries and its autograd, for each of its
backends whose entry exists (a csrc schema of madfast._C, or a Python custom op defined before
this is called). torch.compile traces through the fakes; the backward calls its op directly."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from madfast import _backend

__all__ = ["present", "register"]


def present(name: str) -> bool:
    """True when ``torch.ops.madfast.<name>`` exists."""
    return hasattr(torch.ops.madfast, name)


def register(op: str, *, fake: Callable, backward_fake: Callable | None = None,
             setup_context: Callable | None = None, backward: Callable | None = None,
             backends: tuple[str, ...] | None = None) -> None:
    """``backward(backward_op, ctx, *grads)`` is the gradient formula given the backend's backward
    entry; ``backends`` limits the registration to those (default: every one of the op's)."""
    done: set[str] = set()
    for name, (fwd, bwd) in _backend.OPS[op].kernels.items():
        if (backends is not None and name not in backends) or fwd in done or not present(fwd):
            continue
        done.add(fwd)
        torch.library.register_fake(f"madfast::{fwd}")(fake)
        if bwd is not None and backward_fake is not None:
            torch.library.register_fake(f"madfast::{bwd}")(backward_fake)
        if backward is not None:
            torch.library.register_autograd(f"madfast::{fwd}", partial(backward, getattr(torch.ops.madfast, bwd)),
                                            setup_context=setup_context)
