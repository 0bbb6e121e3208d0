"""Loads the compiled extension defensively and chooses a backend per call.

Backends: "torch" (the reference), "triton", "cuda" (csrc/cuda), "cpp" (csrc, CPU), and "aten" (the
generator block only: fused around ATen's convolution, i.e. cuDNN on CUDA, oneDNN on CPU). OPS,
one table, says which an op has, the order "auto" tries them in per device, and which use float
atomics; `choose` reads it and nothing else picks a backend. On CUDA tensors "auto" takes a fused
backend only where `madfast check` verified it correct and at least as fast as torch on this GPU
architecture (madfast._verified). What the extension provides is asked of the dispatcher, so a
CPU-only build, a build without some op, or no build at all simply narrows the choice.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass, field

import torch

from madfast import _verified

__all__ = ["BACKENDS", "OPS", "Op", "BackendUnavailableError", "extension_loaded", "has_kernel", "triton_usable",
           "choose", "compiled_op", "preferred", "why_nondeterministic"]

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp", "aten")


@dataclass(frozen=True)
class Op:
    """One op's backends, as data: ``kernels`` maps each fused backend to the torch.ops.madfast
    entries (forward, backward or None) that run it; ``auto`` maps a device type to the fused
    backends "auto" tries there, in order, before the torch reference; ``atomics`` says how a
    backend adds floats with atomics on a GPU (its last bits then depend on scheduling)."""
    kernels: dict[str, tuple[str, str | None]]
    auto: dict[str, tuple[str, ...]]
    atomics: dict[str, str] = field(default_factory=dict)


def _compiled(fwd: str, bwd: str | None, triton: str | None = None) -> dict[str, tuple[str, str | None]]:
    """The csrc op (one schema, a kernel per dispatch key) and its Triton twin ``<name>_triton``."""
    return {"cpp": (fwd, bwd), "cuda": (fwd, bwd), "triton": (triton or f"{fwd}_triton", bwd and f"{bwd}_triton")}


_EXTENSION_FIRST = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}
_BN_LRELU_ATOMICS = {"cuda": "atomicAdd for the scale and shift gradients",
                     "triton": "tl.atomic_add for the scale and shift gradients"}
_UPSAMPLE = {"aten": ("upsample_conv_aten", "upsample_conv_backward_aten"),
             "triton": ("upsample_conv_triton", "upsample_conv_backward_triton")}

OPS: dict[str, Op] = {
    "ema_update_": Op(_compiled("ema_update_", None, "ema_update_triton_"), _EXTENSION_FIRST),
    "kl_div_fwd": Op(_compiled("kl_div_fwd", "kl_div_bwd"), _EXTENSION_FIRST),
    "l1_fwd": Op(_compiled("l1_fwd", "l1_bwd"), _EXTENSION_FIRST),
    # on a CPU, ATen's one-pass Welford var_mean: the moments the upsample_conv reference takes
    "channel_moments": Op(_compiled("channel_moments", "channel_moments_backward"), {"cuda": ("cuda", "triton")}),
    "bn_stat_losses": Op(_compiled("bn_stat_losses", "bn_stat_losses_backward"), _EXTENSION_FIRST),
    "bn_lrelu": Op(_compiled("bn_lrelu", "bn_lrelu_backward"), _EXTENSION_FIRST, _BN_LRELU_ATOMICS),
    # ATen's convolution (cuDNN) first: the Triton GEMMs are not yet timed against it; on a CPU
    # oneDNN's fused path has not measured faster than the reference
    "upsample_conv": Op(_UPSAMPLE, {"cuda": ("aten", "triton")}),
    # the generator block, upsample_conv + BN + LeakyReLU: the Triton path normalises with
    # bn_lrelu's Triton kernel, the aten path with whichever bn_lrelu "auto" picks
    "upsample_block": Op(_UPSAMPLE, {"cuda": ("aten", "triton")},
                         {"triton": "bn_lrelu's tl.atomic_add for the scale and shift gradients"}),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def _load_extension() -> str | None:
    try:
        from madfast import _C  # noqa: F401  (registers the C++/CUDA kernels)
    except (ImportError, OSError, RuntimeError) as e:  # RuntimeError: a stale build the dispatcher rejects
        reason = (str(e).splitlines() or [type(e).__name__])[0]  # an empty message still names the error
        warnings.warn(f"madfast: the compiled extension madfast._C could not be loaded ({reason}); the C++/CUDA "
                      "backends are unavailable and the Triton/torch ones are used.", RuntimeWarning, stacklevel=3)
        return reason
    return None


_EXTENSION_ERROR = _load_extension()


def extension_loaded() -> bool:
    """True when madfast._C was imported."""
    return _EXTENSION_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when the dispatcher has a kernel for ``madfast::<op>`` under ``dispatch_key`` ("CPU", "CUDA")."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"madfast::{op}", dispatch_key)
    except RuntimeError:  # the op's schema was never registered (no extension)
        return False


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, and CPU tensors under TRITON_INTERPRET=1."""
    return _why_no_triton(device) is None


def _why_no_triton(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton does not run {device.type} tensors (set TRITON_INTERPRET=1 for CPU tensors)"
    return _interpreter_incompatibility()


@functools.cache
def _interpreter_incompatibility() -> str | None:
    # Triton < 3.7's interpreter turns loop bounds into Python ints with int() of a 1-element array,
    # which NumPy 2.4 made an error: every kernel with a runtime loop bound would fail inside it
    import numpy
    import triton

    def version(v: str) -> tuple[int, int]:
        return tuple(int(p) for p in v.split(".")[:2])
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run under NumPy {numpy.__version__} "
                "(needs triton >= 3.7 or numpy < 2.4)")
    return None


def _spec(op: str) -> Op:
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}: madfast._backend.OPS has {sorted(OPS)}") from None


def _why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    kernels = _spec(op).kernels
    if backend not in kernels:
        return f"{op} has no {backend} backend (it has torch, {', '.join(kernels)})"
    if backend == "aten":
        return None
    if backend == "triton":
        return _why_no_triton(device)
    key = {"cpp": "CPU", "cuda": "CUDA"}[backend]
    if device.type != key.lower():
        return f"the {backend} backend runs {key.lower()} tensors, got {device.type} tensors"
    if not extension_loaded():
        return f"madfast._C is not built or failed to load ({_EXTENSION_ERROR})"
    if not has_kernel(kernels[backend][0], key):
        return f"madfast._C was built without a {key} kernel for {op}"
    return None


def _auto_allows(op: str, candidate: str, device: torch.device, dtype: torch.dtype | None) -> bool:
    """On CUDA tensors a fused backend must have been verified on this GPU architecture."""
    if device.type != "cuda":
        return True
    return _verified.is_verified(op, candidate, _verified.capability_of(device), dtype)


def why_nondeterministic(op: str, backend: str, device: torch.device) -> str | None:
    """How ``backend`` runs ``op`` on ``device`` nondeterministically, or None."""
    if device.type != "cuda":  # CPU kernels and the Triton interpreter add in a fixed order
        return None
    how = _spec(op).atomics.get(backend)
    return f"{op} on the {backend} backend uses {how}" if how else None


def preferred(op: str, backend: str) -> str:
    """``backend`` where ``op`` has it, else "auto": a backend named for a whole model or run (the
    trainer's --backend, $MADFAST_BACKEND) is a preference, and an op without it picks its own."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend if backend in ("auto", "torch") or backend in _spec(op).kernels else "auto"


@torch.compiler.assume_constant_result  # asked once per trace: no graph break under torch.compile
def choose(op: str, backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that runs ``op`` (a key of OPS) on ``device``: ``backend``, else
    $MADFAST_BACKEND (where the op has that backend), else auto: the first of the op's auto order for
    the device that is available and, on a GPU, verified (in ``dtype`` when given), else the torch
    reference.

    Under ``torch.use_deterministic_algorithms(True)`` auto skips backends that use float atomics,
    and an explicit one raises (warns under ``warn_only=True``), as PyTorch's own ops do."""
    if backend is None or backend == "auto":
        backend = os.environ.get("MADFAST_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"MADFAST_BACKEND must be one of {BACKENDS}, got {backend!r}")
        backend = preferred(op, backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    deterministic = torch.are_deterministic_algorithms_enabled()
    if backend == "auto":
        for candidate in _spec(op).auto.get(device.type, ()):
            if (_why_unavailable(op, candidate, device) is None and _auto_allows(op, candidate, device, dtype)
                    and not (deterministic and why_nondeterministic(op, candidate, device))):
                return candidate
        return "torch"
    reason = _why_unavailable(op, backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend={backend!r} is unavailable: {reason}")
    how = why_nondeterministic(op, backend, device) if deterministic else None
    if how is not None:
        exact = ["auto", "torch"] + [b for b in _spec(op).kernels if b not in _spec(op).atomics]
        msg = (f"{how}, which is not deterministic, but torch.use_deterministic_algorithms(True) is set: "
               f"use backend={' or '.join(map(repr, exact))}, or turn determinism off")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    return backend


def compiled_op(op: str, backend: str, backward: bool = False):
    """The torch.ops.madfast entry (the forward, or with ``backward`` its backward) that runs
    ``op`` on the fused ``backend``."""
    return getattr(torch.ops.madfast, _spec(op).kernels[backend][int(backward)])
