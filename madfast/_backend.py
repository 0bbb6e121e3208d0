"""Loads the compiled extension defensively and chooses a backend per call.

Backends: "torch" (the reference), "triton", "cuda" (csrc/cuda), "cpp" (csrc, CPU), and "aten" (the
generator block only: fused around ATen's convolution, i.e. cuDNN on CUDA, oneDNN on CPU).
"auto" on CPU tensors picks C++ > torch. On CUDA tensors it picks, in the op's order (CUDA extension >
Triton > torch unless the op says otherwise), the first fused backend that `madfast check` verified
correct and at least as fast as torch on this GPU architecture (madfast._verified), else torch.
What the extension provides is asked of the dispatcher, so a CPU-only build, a build without
some op, or no build at all simply narrows the choice.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from madfast import _verified

__all__ = ["BACKENDS", "BackendUnavailableError", "extension_loaded", "has_kernel", "triton_usable", "choose",
           "compiled_op"]

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp", "aten")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
# ops that have a path fused around ATen's own kernels (backend "aten")
ATEN_OPS = frozenset({"upsample_conv"})


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def _load_extension() -> str | None:
    try:
        from madfast import _C  # noqa: F401  (registers the C++/CUDA kernels)
    except (ImportError, OSError, RuntimeError) as e:  # RuntimeError: a stale build the dispatcher rejects
        warnings.warn(
            f"madfast: the compiled extension madfast._C could not be loaded ({str(e).splitlines()[0]}); "
            "the C++/CUDA backends are unavailable and the Triton/torch ones are used.",
            RuntimeWarning,
            stacklevel=3,
        )
        return str(e).splitlines()[0]
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
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _why_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    if backend == "torch":
        return None
    if backend == "aten":
        return None if op in ATEN_OPS else f"only {sorted(ATEN_OPS)} have an aten path"
    if backend == "triton":
        return None if triton_usable(device) else (
            "triton is not installed" if importlib.util.find_spec("triton") is None
            else f"Triton does not run {device.type} tensors (set TRITON_INTERPRET=1 for CPU tensors)"
        )
    key = {"cpp": "CPU", "cuda": "CUDA"}[backend]
    if device.type != key.lower():
        return f"the {backend} backend runs {key.lower()} tensors, got {device.type} tensors"
    if not extension_loaded():
        return f"madfast._C is not built or failed to load ({_EXTENSION_ERROR})"
    if not has_kernel(op, key):
        return f"madfast._C was built without a {key} kernel for {op}"
    return None


def _auto_allows(op: str, candidate: str, device: torch.device, dtype: torch.dtype | None) -> bool:
    """On CUDA tensors a fused backend must have been verified on this GPU architecture."""
    if candidate == "torch" or device.type != "cuda":
        return True
    return _verified.is_verified(op, candidate, _verified.capability_of(device), dtype)


# GPU kernels that add floats with atomics (the result's last bits depend on scheduling), and how.
NONDETERMINISTIC = {
    ("upsample_conv", "cuda"): "atomicAdd for the weight gradient (and the sums of stats=True)",
    ("bn_lrelu", "cuda"): "atomicAdd for the scale and shift gradients",
    ("bn_lrelu", "triton"): "tl.atomic_add for the scale and shift gradients",
}


def why_nondeterministic(ops: tuple[str, ...], backend: str, device: torch.device) -> str | None:
    """How ``backend`` runs one of ``ops`` on ``device`` nondeterministically, or None."""
    if device.type != "cuda":  # CPU kernels and the Triton interpreter add in a fixed order
        return None
    for op in ops:
        if (op, backend) in NONDETERMINISTIC:
            return f"{op} on the {backend} backend uses {NONDETERMINISTIC[op, backend]}"
    return None


@torch.compiler.assume_constant_result  # asked once per trace: no graph break under torch.compile
def choose(op: str, backend: str | None, device: torch.device, auto: tuple[str, ...] | None = None,
           dtype: torch.dtype | None = None, also: tuple[str, ...] = ()) -> str:
    """The backend that runs ``op`` on ``device``: ``backend``, else $MADFAST_BACKEND, else auto.
    ``auto`` overrides the auto order for ops whose fused kernels are not yet the better default;
    ``dtype`` narrows the verified-dispatch lookup to measurements in that dtype; ``also`` names ops
    the caller runs on the same backend (for the determinism rule).

    Under ``torch.use_deterministic_algorithms(True)`` auto skips backends that use float atomics,
    and an explicit one raises (warns under ``warn_only=True``), as PyTorch's own ops do."""
    if backend is None or backend == "auto":
        backend = os.environ.get("MADFAST_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    deterministic = torch.are_deterministic_algorithms_enabled()
    if backend == "auto":
        for candidate in auto or _AUTO_ORDER.get(device.type, ("torch",)):
            if (_why_unavailable(op, candidate, device) is None and _auto_allows(op, candidate, device, dtype)
                    and not (deterministic and why_nondeterministic((op, *also), candidate, device))):
                return candidate
        return "torch"
    reason = _why_unavailable(op, backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend={backend!r} is unavailable: {reason}")
    how = why_nondeterministic((op, *also), backend, device) if deterministic else None
    if how is not None:
        msg = (f"{how}, which is not deterministic, but torch.use_deterministic_algorithms(True) is set: "
               f"use backend='auto', 'torch' or (for upsample_conv) 'aten', or turn determinism off")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    return backend


def compiled_op(op: str, backend: str):
    """The torch.ops entry that runs ``op`` on a compiled backend: ``madfast::<op>`` for the
    C++/CUDA kernels (one op, a kernel per dispatch key), ``madfast::<op>_triton`` for Triton."""
    return getattr(torch.ops.madfast, f"{op}_triton" if backend == "triton" else op)
