"""2-process DDP on CPU (gloo) through torchrun, as users launch it."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from madfast.train.checkpoint import list_checkpoints, load_checkpoint
from mad_helpers import finish, run_command, tiny_teacher
from test_crash_safety import ENV, RUN, assert_same_run, wait_for


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


# -- torchrun --max-restarts: a worker that dies, or a rank that is preempted, and the same command --


def _elastic(out, teacher) -> subprocess.Popen:
    """A 2-rank torchrun job that torchrun restarts once after a failure, continuing with `--resume auto`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "-m", "madfast", "distill", *RUN,
           "--teacher-ckpt", teacher, "--out", str(out), "--resume", "auto"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)


def _worker_pid(agent: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker process for ``rank`` (Linux: /proc)."""
    for pid in open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split():
        if f"RANK={rank}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
            return int(pid)
    raise AssertionError(f"torchrun has no worker of rank {rank}")


@pytest.fixture(scope="module")
def elastic_teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def uninterrupted(elastic_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    finish(_elastic(out, elastic_teacher), timeout=300)
    return out


def _interrupted(tmp_path, teacher, signum) -> str:
    proc = _elastic(tmp_path, teacher)
    wait_for(lambda: len(list_checkpoints(str(tmp_path))) >= 1, proc)  # past step 4 of 40
    os.kill(_worker_pid(proc, 1), signum)
    return "".join(finish(proc, timeout=300))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_a_worker_killed_mid_run_is_restarted_and_the_run_is_exact(elastic_teacher, uninterrupted, tmp_path):
    """kill -9 of rank 1: torchrun stops rank 0, starts both again with the same command, and
    `--resume auto` continues from the newest checkpoint: the final run equals an uninterrupted one
    bit for bit (every rank's noise and RNG come back; both jobs run on one machine, same kernels)."""
    err = _interrupted(tmp_path, elastic_teacher, signal.SIGKILL)
    assert re.search(r"resuming \S+ at step \d+/40", err), err[-3000:]
    assert_same_run(uninterrupted, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_a_signal_to_one_rank_stops_every_rank_with_one_checkpoint(elastic_teacher, uninterrupted, tmp_path):
    """SIGUSR1 to rank 1 alone: the ranks agree to stop after the same iteration, write one
    checkpoint and exit 75; torchrun's restart continues it to the same end as an uninterrupted run."""
    err = _interrupted(tmp_path, elastic_teacher, signal.SIGUSR1)
    assert re.search(r"preempted by SIGUSR1 at step \d+/40; checkpoint written", err), err[-3000:]
    assert_same_run(uninterrupted, tmp_path)


@pytest.mark.slow
def test_a_scheduler_sigterm_to_torchrun_checkpoints_and_the_same_command_resumes(elastic_teacher, uninterrupted,
                                                                                tmp_path):
    """What SLURM's scancel or a Kubernetes eviction does: SIGTERM to the torchrun agent. The agent
    passes it to every worker; they stop after the same iteration with one checkpoint, torchrun does
    not restart (a signal is not a failure), and the same command started again ends where an
    uninterrupted run does, bit for bit."""
    proc = _elastic(tmp_path, elastic_teacher)
    wait_for(lambda: len(list_checkpoints(str(tmp_path))) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode != 0, "torchrun reported success for a run stopped early"
    assert re.search(r"preempted by SIGTERM at step \d+/40; checkpoint written", err), err[-3000:]
    stopped = load_checkpoint(str(tmp_path))["step"]
    assert 0 < stopped < 40
    err = "".join(finish(_elastic(tmp_path, elastic_teacher), timeout=300))
    assert f"at step {stopped}/40" in err, err[-3000:]
    assert_same_run(uninterrupted, tmp_path)
