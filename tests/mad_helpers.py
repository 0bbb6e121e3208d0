"""Shared by the tests: a tiny digits teacher and distill configs (trainer, CLI and DDP tests), and a
recorder of the madfast ops a piece of code dispatches."""

from __future__ import annotations

import os
import signal
import subprocess

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from madfast.train import DistillConfig, TeacherConfig, train_teacher

_TEACHERS: dict[str, str] = {}


class MadfastOps(TorchDispatchMode):
    """While active: the names of the ``madfast::`` ops dispatched, in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "madfast":
            self.ops.append(func._opname)
        return func(*args, **(kwargs or {}))


def tiny_teacher(root) -> str:
    """A small_cnn digits teacher (trained once per test session, in seconds)."""
    key = "small_cnn"
    if key not in _TEACHERS:
        out = os.path.join(str(root), "teacher")
        train_teacher(TeacherConfig(dataset="digits", model="small_cnn", epochs=3, batch_size=64, optimizer="adam",
                                    lr=3e-3, weight_decay=0.0, out=out, progress=False))
        _TEACHERS[key] = os.path.join(out, "teacher.pt")
    return _TEACHERS[key]


def tiny_config(teacher_ckpt: str, out, **overrides) -> DistillConfig:
    """A MAD run of a few seconds: every part of the iteration, at toy sizes."""
    values = dict(dataset="digits", teacher="small_cnn", teacher_ckpt=teacher_ckpt, student="small_cnn_half",
                  nz=16, ngf=8, batch_size=16, steps=4, g_pretrain_steps=2, s_steps=2, out=str(out),
                  log_every=1, eval_every=0, ckpt_every=2, keep_ckpts=2, tensorboard=False, progress=False,
                  num_workers=0, device="cpu")
    values.update(overrides)
    return DistillConfig(**values)


def assert_same_networks(a: dict, b: dict) -> None:
    """Two distill checkpoints hold bit-identical student, generator and EMA-generator weights."""
    for name in ("student", "generator", "ema"):
        for k, v in a["task"][name].items():
            assert torch.equal(v, b["task"][name][k]), (name, k)


def run_command(cmd: list[str], timeout: float = 300, **env) -> tuple[str, str]:
    """Runs ``cmd`` (one thread per process) in its own session, so that on a timeout it is killed
    with every process it started (torchrun's workers); returns (stdout, stderr), asserting exit 0."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, start_new_session=True)
    return finish(proc, timeout)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    """Waits for ``proc`` (started with start_new_session=True); kills its session on a timeout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-4000:]
    return out, err
