"""2-process DDP on CPU (gloo) through torchrun, as users launch it."""

import sys

import pytest
import torch

from madfast.train.checkpoint import load_checkpoint
from mad_helpers import run_command, tiny_teacher


@pytest.mark.slow
def test_two_process_gloo_distill(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "madfast", "distill", "--dataset", "digits", "--teacher", "small_cnn", "--teacher-ckpt", teacher,
           "--student", "small_cnn_half", "--nz", "16", "--ngf", "8", "--batch-size", "16", "--steps", "3",
           "--g-pretrain-steps", "1", "--s-steps", "2", "--device", "cpu", "--no-progress", "--no-tensorboard",
           "--num-workers", "0", "--ckpt-every", "2", "--out", str(out)]
    stdout, _ = run_command(cmd, 300)
    # Each checkpoint asserted the EMA generator identical on both ranks before writing.
    state = load_checkpoint(str(out))
    assert state["step"] == 4 and len(state["noise"]) == 2
    assert not torch.equal(state["noise"][0], state["noise"][1])  # per-rank noise streams
    assert "finished" in stdout and stdout.count("finished") == 1  # rank 0 alone reports
    assert (out / "summary.json").exists()


def _torchrun(args, timeout=300):
    return run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        "-m", "madfast", "distill", *args], timeout)[0]


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path):
    """2 ranks stopped after 2 iterations and resumed == 2 ranks uninterrupted, bit for bit: every
    rank's noise stream and RNG come back from the checkpoint. Exact on any CPU: both runs are
    torchrun jobs of one machine and environment (one thread per rank), the same kernels."""
    teacher = tiny_teacher(tmp_path / "teacher")
    run = ["--dataset", "digits", "--teacher", "small_cnn", "--teacher-ckpt", teacher, "--student", "small_cnn_half",
           "--nz", "16", "--ngf", "8", "--batch-size", "16", "--steps", "3", "--g-pretrain-steps", "1",
           "--s-steps", "2", "--device", "cpu", "--no-progress", "--no-tensorboard", "--num-workers", "0",
           "--ckpt-every", "100", "--eval-every", "0"]
    _torchrun([*run, "--out", str(tmp_path / "full")])
    _torchrun([*run, "--out", str(tmp_path / "part"), "--stop-after", "2"])
    _torchrun(["--resume", str(tmp_path / "part")])
    a, b = load_checkpoint(str(tmp_path / "full")), load_checkpoint(str(tmp_path / "part"))
    assert a["step"] == b["step"] == 4
    for name in ("student", "generator", "ema"):
        for k, v in a["task"][name].items():
            assert torch.equal(v, b["task"][name][k]), (name, k)
    assert all(torch.equal(x, y) for x, y in zip(a["noise"], b["noise"]))
