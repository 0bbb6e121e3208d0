"""Crash safety: kill -9 while a checkpoint is being written and mid-iteration, then --resume; the
result equals an uninterrupted run bit for bit (CPU). Also keep-K, and a corrupt newest checkpoint.

The mid-write kill uses checkpoint.py's test-only MADFAST_TEST_CKPT_PAUSE hook: the named file's
write stops half-way and says so on stderr, and the test kills the process there.

Bit-exact on any CPU: the reference and the resumed run are processes of one machine started with
one environment (one thread each), so they execute the same kernels in the same order.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from madfast.errors import CheckpointError
from madfast.train import distill
from madfast.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from madfast.train.logger import read_metrics
from madfast.train.loop import LOSS_COLUMNS
from mad_helpers import assert_same_networks, finish, tiny_config, tiny_teacher

# 40 iterations of a toy MAD run: long enough to be killed mid-run, a few seconds in all.
RUN = ["--dataset", "digits", "--teacher", "small_cnn", "--student", "small_cnn_half", "--nz", "16", "--ngf", "8",
       "--batch-size", "16", "--steps", "38", "--g-pretrain-steps", "2", "--s-steps", "2", "--log-every", "1",
       "--eval-every", "0", "--ckpt-every", "4", "--keep-ckpts", "2", "--device", "cpu", "--no-progress",
       "--no-tensorboard", "--num-workers", "0"]
TOTAL = 40
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher"))


def start(args, **env):
    return subprocess.Popen([sys.executable, "-m", "madfast", "distill", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**ENV, **env}, start_new_session=True)


def kill9(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def wait_for(predicate, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill point: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            kill9(proc)
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.002)


def assert_every_checkpoint_reads(out):
    """What a crash leaves behind: only complete checkpoints (a temp file at most)."""
    for path in list_checkpoints(str(out)):
        assert isinstance(torch.load(path, weights_only=False), dict), path


def assert_same_run(a, b):
    sa, sb = load_checkpoint(str(a)), load_checkpoint(str(b))
    assert sa["step"] == sb["step"] == TOTAL
    assert_same_networks(sa, sb)
    for name in ("opt_g", "opt_s"):
        for i, st in sa["task"][name]["state"].items():
            for k, v in st.items():
                assert torch.equal(v, sb["task"][name]["state"][i][k]), (name, i, k)
    assert all(torch.equal(x, y) for x, y in zip(sa["noise"], sb["noise"]))
    cols = ["step", *LOSS_COLUMNS]
    rows_a = [[r[c] for c in cols] for r in read_metrics(str(a / "metrics.csv"))]
    rows_b = [[r[c] for c in cols] for r in read_metrics(str(b / "metrics.csv"))]
    assert len(rows_a) == TOTAL and rows_a == rows_b


@pytest.mark.slow
def test_kill9_mid_checkpoint_write_and_mid_iteration_then_resume_is_exact(teacher, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = start([*RUN, "--teacher-ckpt", teacher, "--out", str(ref)])

    # 1. killed half-way through writing ckpt-00000012.pt (ckpt-8 is complete, ckpt-4 pruned)
    proc = start([*RUN, "--teacher-ckpt", teacher, "--out", str(run)], MADFAST_TEST_CKPT_PAUSE="ckpt-00000012.pt")
    for line in proc.stderr:
        if line.startswith("MADFAST_TEST_CKPT_PAUSE: paused writing"):
            break
    else:
        raise AssertionError("the run never reached the paused write")
    kill9(proc)
    assert [os.path.basename(p) for p in list_checkpoints(str(run))] == ["ckpt-00000004.pt", "ckpt-00000008.pt"]
    assert any(".tmp-" in f for f in os.listdir(run))  # the half-written file is there, under a temp name
    assert_every_checkpoint_reads(run)

    # 2. resumed from step 8, killed mid-iteration after step 21 was logged (last checkpoint: 20)
    proc = start(["--resume", str(run)])
    wait_for(lambda: any(int(r["step"]) >= 21 for r in read_metrics(str(run / "metrics.csv"))
                         if r.get("step")), proc)
    kill9(proc)
    assert_every_checkpoint_reads(run)
    last = load_checkpoint(str(run))["step"]
    assert 20 <= last < TOTAL, last
    assert not (run / "summary.json").exists()

    # 3. resumed to the end: no warning (nothing was corrupt), no temp file left, equal to the reference
    _, err = finish(start(["--resume", str(run)]))
    assert "falling back" not in err and "could not be read" not in err, err[-2000:]
    assert not any(".tmp-" in f for f in os.listdir(run))
    finish(reference)
    assert_same_run(ref, run)


@pytest.mark.parametrize("auto", [False, True], ids=["resume-dir", "resume-auto"])
def test_truncated_newest_checkpoint_falls_back_and_resumes_exactly(teacher, tmp_path, auto):
    full = tiny_config(teacher, tmp_path / "full", ckpt_every=2, keep_ckpts=2)
    distill(full)
    # the run kept its K = 2 newest checkpoints
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "full"))] == ["ckpt-00000004.pt",
                                                                                     "ckpt-00000006.pt"]
    part = tiny_config(teacher, tmp_path / "part", ckpt_every=2, keep_ckpts=3)
    distill(part, stop_after=4)
    newest = tmp_path / "part" / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a full disk, a half copy
    with pytest.warns(RuntimeWarning, match=r"ckpt-00000004\.pt.*could not be read.*falling back to .*ckpt-00000002"):
        distill(part, resume="auto" if auto else str(tmp_path / "part"))
    a, b = load_checkpoint(str(tmp_path / "full")), load_checkpoint(str(tmp_path / "part"))
    assert a["step"] == b["step"] == 6
    assert_same_networks(a, b)


def test_load_checkpoint_fallback_and_errors(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint({"step": step}, str(tmp_path), step, keep=3)
    (tmp_path / "ckpt-00000003.pt").write_bytes(b"")
    (tmp_path / "ckpt-00000002.pt").write_bytes(b"not a zip")
    with pytest.warns(RuntimeWarning) as warned:
        assert load_checkpoint(str(tmp_path))["step"] == 1
    assert len(warned) == 2 and "ckpt-00000003.pt" in str(warned[0].message)
    with pytest.raises(CheckpointError, match=r"ckpt-00000003\.pt.*could not be read"):
        load_checkpoint(str(tmp_path / "ckpt-00000003.pt"))  # a file named explicitly: no fallback
    (tmp_path / "ckpt-00000001.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint could be read"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_checkpoint(str(tmp_path / "empty"))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_k_newest_checkpoints_and_no_temp_files(tmp_path, keep):
    (tmp_path / "ckpt-00000000.pt.tmp-999999").write_bytes(b"half")  # left by a killed writer
    for step in range(1, 6):
        save_checkpoint({"step": step}, str(tmp_path), step, keep=keep)
        names = sorted(os.listdir(tmp_path))
        assert names == [f"ckpt-{s:08d}.pt" for s in range(max(1, step - keep + 1), step + 1)]
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint({}, str(tmp_path), 9, keep=0)
