"""Checkpoints: atomic writes (temp file + fsync + rename), the last K kept, a fallback past a
corrupt newest file, RNG states, teacher files (read by madfast.models.checkpoints)."""

from __future__ import annotations

import glob
import io
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

from madfast.errors import CheckpointError

__all__ = ["save_atomic", "save_checkpoint", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "rng_state", "set_rng_state", "save_teacher"]

_PATTERN = "ckpt-{:08d}.pt"
# Test-only: the basename of a file whose write pauses half-way (stderr says so), so that a test
# can kill -9 the process mid-write. Never set it outside tests/test_crash_safety.py.
_PAUSE_ENV = "MADFAST_TEST_CKPT_PAUSE"


def _write(obj, path: str, pause_as: str) -> None:
    """torch.save into ``path``, then flush and fsync (the bytes are on disk before any rename)."""
    with open(path, "wb") as f:
        if os.environ.get(_PAUSE_ENV) == os.path.basename(pause_as):
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            print(f"{_PAUSE_ENV}: paused writing {pause_as}", file=sys.stderr, flush=True)
            time.sleep(60)
            f.write(data[len(data) // 2:])
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_atomic(obj, path: str) -> None:
    """torch.save to a temp file beside ``path``, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _write(obj, tmp, pause_as=path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_checkpoints(out: str) -> list[str]:
    """OUT/ckpt-*.pt, oldest first (temp files of interrupted writes are not checkpoints)."""
    return sorted(glob.glob(os.path.join(out, "ckpt-*.pt")))


def save_checkpoint(state: dict, out: str, step: int, keep: int) -> str:
    """OUT/ckpt-<step>.pt, then drops all but the ``keep`` newest and any temp file a killed write left."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_checkpoint: keep must be an int ≥ 1, got {keep!r}")
    path = os.path.join(out, _PATTERN.format(step))
    save_atomic(state, path)
    for old in list_checkpoints(out)[:-keep]:
        os.remove(old)
    for stale in glob.glob(os.path.join(out, "ckpt-*.pt.tmp-*")):
        os.remove(stale)
    return path


def latest_checkpoint(out: str) -> str | None:
    paths = list_checkpoints(out)
    return paths[-1] if paths else None


def _read(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle/zip errors have no common base
        raise CheckpointError(f"checkpoint {path!r} could not be read: {e}") from None


def load_checkpoint(path: str) -> dict:
    """A checkpoint file, or the newest readable ckpt-*.pt of a run folder (an unreadable newer
    one, e.g. truncated by a full disk, is skipped with a warning)."""
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path!r} does not exist")
        return _read(path)
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path!r} holds no checkpoint (ckpt-*.pt)")
    errors = []
    for candidate in reversed(found):
        try:
            state = _read(candidate)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        for e in errors:
            warnings.warn(f"{e}; falling back to {candidate!r}", RuntimeWarning, stacklevel=2)
        return state
    raise CheckpointError(f"{path!r}: no checkpoint could be read ({'; '.join(errors)})")


def rng_state() -> dict:
    """The global generators (python, numpy, torch CPU and CUDA)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_teacher(path: str, model: nn.Module, name: str, num_classes: int, channels: int, dataset: str,
                 img_size: int, test_acc: float, config: dict) -> None:
    save_atomic({"format": "madfast-teacher/1", "model": name, "num_classes": num_classes, "channels": channels,
                 "dataset": dataset, "img_size": img_size, "test_acc": test_acc, "config": config,
                 "state_dict": model.state_dict()}, path)
