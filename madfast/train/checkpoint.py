"""Checkpoints: atomic writes (temp file + rename), the last K kept, RNG states, teacher files."""

from __future__ import annotations

import glob
import os
import random

import numpy as np
import torch
from torch import nn

from madfast.errors import CheckpointError

__all__ = ["save_atomic", "save_checkpoint", "latest_checkpoint", "load_checkpoint", "rng_state",
           "set_rng_state", "save_teacher", "load_teacher"]

_PATTERN = "ckpt-{:08d}.pt"


def save_atomic(obj, path: str) -> None:
    """torch.save to a temp file beside ``path``, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(state: dict, out: str, step: int, keep: int) -> str:
    """OUT/ckpt-<step>.pt, then drops all but the ``keep`` newest."""
    path = os.path.join(out, _PATTERN.format(step))
    save_atomic(state, path)
    for old in sorted(glob.glob(os.path.join(out, "ckpt-*.pt")))[:-keep]:
        os.remove(old)
    return path


def latest_checkpoint(out: str) -> str | None:
    paths = sorted(glob.glob(os.path.join(out, "ckpt-*.pt")))
    return paths[-1] if paths else None


def load_checkpoint(path: str) -> dict:
    """A checkpoint file, or the newest ckpt-*.pt of a run folder."""
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path!r} holds no checkpoint (ckpt-*.pt)")
        path = found
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle/zip errors have no common base
        raise CheckpointError(f"checkpoint {path!r} could not be read: {e}") from None


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


def load_teacher(path: str | None, model: nn.Module, name: str, num_classes: int, channels: int) -> dict:
    """Loads a `madfast train-teacher` file into ``model`` after checking it is the same architecture."""
    if not path:
        raise CheckpointError("--teacher-ckpt is required (train one with `madfast train-teacher`)")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "madfast-teacher/1":
        raise CheckpointError(f"--teacher-ckpt {path!r} is not a teacher checkpoint of `madfast train-teacher`")
    if (ckpt["model"], ckpt["num_classes"], ckpt["channels"]) != (name, num_classes, channels):
        raise CheckpointError(
            f"--teacher-ckpt {path!r} holds a {ckpt['model']!r} with {ckpt['num_classes']} classes and "
            f"{ckpt['channels']} channels, but the run asks for a {name!r} with {num_classes} classes and {channels} channels")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"--teacher-ckpt {path!r} does not load into {name!r}: {str(e).splitlines()[0]}") from None
    return ckpt
