"""Runs that survive their cluster: `--resume auto` (the same command starts a run and continues it),
and preemption — SIGTERM/SIGUSR1 stops after the current iteration with one checkpoint and exit
status 75; a second signal stops at once, abandoning a checkpoint being written, never the newest
complete one. Each interrupted run, continued with the same command, equals an uninterrupted one
bit for bit (CPU; see test_crash_safety for why that holds on any CPU)."""

import dataclasses
import os
import signal
import time

import pytest

from madfast.cli import main
from madfast.errors import UsageError
from madfast.train import distill
from madfast.train.checkpoint import list_checkpoints, load_checkpoint
from madfast.train.preemption import EXIT_PREEMPTED
from mad_helpers import assert_same_networks, finish, tiny_config, tiny_teacher
from test_crash_safety import RUN, TOTAL, assert_same_run, start, wait_for

AUTO = ["--resume", "auto"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher"))


def test_resume_auto_starts_then_continues_exactly(teacher, tmp_path):
    cfg = tiny_config(teacher, tmp_path / "run", steps=6, ckpt_every=2)
    assert distill(cfg, resume="auto", stop_after=3)["step"] == 3  # an empty --out: a fresh start
    assert distill(cfg, resume="auto")["finished"]  # the same call again: continued from step 3
    reference = tiny_config(teacher, tmp_path / "ref", steps=6, ckpt_every=2)
    distill(reference)
    assert_same_networks(load_checkpoint(str(tmp_path / "run")), load_checkpoint(str(tmp_path / "ref")))


def test_resume_auto_refuses_another_config_naming_the_field(teacher, tmp_path):
    cfg = tiny_config(teacher, tmp_path, steps=4, ckpt_every=2)
    distill(cfg, resume="auto", stop_after=2)
    with pytest.raises(UsageError, match=r"--ema-decay is 0\.5 \(the run.s: 0\.95\), --lr-s is 0\.5"):
        distill(dataclasses.replace(cfg, lr_s=0.5, ema_decay=0.5), resume="auto")
    # run length and logging may change between restarts
    summary = distill(dataclasses.replace(cfg, steps=5, log_every=2, progress=False), resume="auto")
    assert summary["finished"] and summary["step"] == 5 + cfg.g_pretrain_steps


def test_resume_auto_from_the_command_line(teacher, tmp_path, capsys):
    args = ["distill", *RUN, "--steps", "4", "--teacher-ckpt", teacher, "--out", str(tmp_path), *AUTO]
    assert main([*args, "--stop-after", "2"]) == 0
    assert main(args) == 0
    assert load_checkpoint(str(tmp_path))["step"] == 4 + 2
    assert main([*args, "--lr-g", "0.5"]) == 2
    assert "--lr-g is 0.5" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_stops_with_a_checkpoint_and_the_same_command_continues(teacher, tmp_path, signum):
    ref, run = tmp_path / "ref", tmp_path / "run"
    reference = start([*RUN, "--teacher-ckpt", teacher, "--out", str(ref)])
    command = [*RUN, "--teacher-ckpt", teacher, "--out", str(run), *AUTO]
    proc = start(command)
    wait_for(lambda: len(list_checkpoints(str(run))) >= 1, proc)  # past step 4, mid-run
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    state = load_checkpoint(str(run))
    assert 4 <= state["step"] < TOTAL  # the stop's own checkpoint (or a regular one, if it fell there)
    assert f"preempted by {signal.Signals(signum).name} at step {state['step']}/{TOTAL}" in err
    finish(start(command))
    finish(reference)
    assert_same_run(ref, run)


def test_a_second_signal_abandons_the_checkpoint_being_written(teacher, tmp_path):
    run = tmp_path / "run"
    command = [*RUN, "--teacher-ckpt", teacher, "--out", str(run), *AUTO]
    proc = start(command, MADFAST_TEST_CKPT_PAUSE="ckpt-00000012.pt")
    for line in proc.stderr:
        if line.startswith("MADFAST_TEST_CKPT_PAUSE: paused writing"):
            break
    else:
        raise AssertionError("the run never reached the paused write")
    os.killpg(proc.pid, signal.SIGTERM)  # the first: stop after this iteration (the write goes on)
    time.sleep(1)  # two signals before Python runs its handler would be seen as one
    os.killpg(proc.pid, signal.SIGTERM)  # the second: now
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "stopped at once by a second SIGTERM" in err
    names = [os.path.basename(p) for p in list_checkpoints(str(run))]
    assert names == ["ckpt-00000004.pt", "ckpt-00000008.pt"] and not any(".tmp-" in f for f in os.listdir(run))
    assert load_checkpoint(str(run))["step"] == 8
    finish(start(command))
    assert load_checkpoint(str(run))["step"] == TOTAL

