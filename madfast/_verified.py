"""Verified dispatch: which fused backends ``auto`` may take on a CUDA GPU.

On CUDA tensors ``auto`` takes a fused backend for an op only where a `madfast check` measurement on
the same GPU architecture (compute capability) found it correct and at least as fast as the torch
reference. Measurements come from ``madfast/verified.json`` (committed, from `make gpu-check` runs) and
``$MADFAST_CACHE_DIR/verified.json`` (default ``~/.cache/madfast``, from ``madfast check --save``), whose
entries replace the packaged ones of the same (op, backend, dtype, capability).

An entry: ``{"op": "kl_div_fwd", "backend": "cuda", "dtype": "float32", "gpu": "NVIDIA H100 80GB HBM3",
"capability": "9.0", "ratio": 2.4, "ok": true, "date": "...", "commit": "...", "check_ops": ["kl"]}`` —
``op`` is the dispatcher op that ``madfast._backend.choose`` is asked about, ``ratio`` the geometric mean
over the shapes the check timed of (torch reference time / backend time). A file that cannot be read is
ignored with one warning: ``auto`` then keeps the torch reference, it never fails a training run.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

import torch

__all__ = ["PACKAGED", "cache_file", "read_entries", "load_entries", "is_verified", "merge_entries", "capability_of",
           "REQUIRED_KEYS"]

PACKAGED = Path(__file__).with_name("verified.json")
REQUIRED_KEYS = ("op", "backend", "dtype", "gpu", "capability", "ratio", "ok", "date", "commit")


def cache_file() -> Path:
    """Where ``madfast check --save`` writes: $MADFAST_CACHE_DIR/verified.json (default ~/.cache/madfast)."""
    root = os.environ.get("MADFAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "madfast")
    return Path(root) / "verified.json"


def read_entries(path: Path) -> list[dict]:
    """The entries of a verified-dispatch file ([] when there is none); ValueError naming the file
    when it cannot be read or is malformed."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        entries = data["entries"] if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError('expected {"entries": [...]}')
        for i, e in enumerate(entries):
            missing = [k for k in REQUIRED_KEYS if not isinstance(e, dict) or k not in e]
            if missing:
                raise ValueError(f"entry {i} lacks {', '.join(missing)}")
        return entries
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"the verified-dispatch file {path} is unreadable ({e})") from None


def _read_or_warn(path: Path) -> list[dict]:
    try:
        return read_entries(path)
    except ValueError as e:
        warnings.warn(f"madfast: ignoring it: {e}; 'auto' uses the torch reference for the kernels it would have "
                      "verified. Rewrite it with `madfast check --save`.", RuntimeWarning, stacklevel=5)
        return []


def merge_entries(*lists: list[dict]) -> list[dict]:
    """Later lists replace earlier entries of the same (op, backend, dtype, capability)."""
    merged: dict[tuple, dict] = {}
    for entries in lists:
        for e in entries:
            merged[(e["op"], e["backend"], e["dtype"], e["capability"])] = e
    return list(merged.values())


@functools.lru_cache(maxsize=None)
def _load(packaged: str, cache: str) -> tuple[dict, ...]:
    return tuple(merge_entries(_read_or_warn(Path(packaged)), _read_or_warn(Path(cache))))


def load_entries() -> tuple[dict, ...]:
    """The packaged entries merged with the user's cache (read once per process and cache path)."""
    return _load(str(PACKAGED), str(cache_file()))


def capability_of(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def is_verified(op: str, backend: str, capability: str, dtype: torch.dtype | None = None,
                entries: tuple[dict, ...] | list[dict] | None = None) -> bool:
    """True when measurements show ``backend`` correct and no slower than torch for ``op`` on GPUs of
    ``capability`` (in ``dtype`` when given, else in every dtype measured)."""
    name = None if dtype is None else str(dtype).removeprefix("torch.")
    found = [e for e in (load_entries() if entries is None else entries)
             if e["op"] == op and e["backend"] == backend and e["capability"] == capability
             and (name is None or e["dtype"] == name)]
    return bool(found) and all(e["ok"] is True and float(e["ratio"]) >= 1.0 for e in found)
