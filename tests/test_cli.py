"""The `madfast` command line: --help everywhere, a distill/eval/resume round, every bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from madfast.cli import main
from madfast.models import build_model
from madfast.train.checkpoint import load_checkpoint, save_teacher
from mad_helpers import tiny_teacher

COMMANDS = ["demo", "train-teacher", "distill", "eval", "bench"]
TINY = ["--dataset", "digits", "--teacher", "small_cnn", "--student", "small_cnn_half", "--nz", "16", "--ngf", "8",
        "--batch-size", "16", "--steps", "3", "--g-pretrain-steps", "1", "--s-steps", "2", "--no-progress",
        "--no-tensorboard", "--device", "cpu", "--num-workers", "0", "--ckpt-every", "2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: madfast " + command in capsys.readouterr().out


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "madfast", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)


def test_distill_eval_resume_and_config_file(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("ema_decay: 0.9\nconditioning: cat\n")
    assert main(["distill", *TINY, "--teacher-ckpt", teacher, "--out", str(out), "--config", str(cfg),
                 "--stop-after", "2"]) == 0
    assert "stopped at step 2/4" in capsys.readouterr().out
    assert main(["distill", "--resume", str(out)]) == 0
    assert "finished" in capsys.readouterr().out
    state = load_checkpoint(str(out))
    assert state["step"] == 4 and state["config"]["ema_decay"] == 0.9 and state["config"]["conditioning"] == "cat"
    assert main(["eval", str(out)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == "small_cnn_half" and 0 <= r["top1"] <= 100
    assert main(["eval", teacher]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] > 80


def _fails(argv, capsys, match: str, code: int = 2) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_inputs_fail_with_one_line_and_write_nothing(teacher, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["distill", *TINY, "--out", str(out)]
    _fails([*base, "--teacher-ckpt", teacher, "--dataset", "cifar10", "--data-dir", str(tmp_path / "missing")],
           capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    _fails([*base, "--teacher-ckpt", teacher, "--dataset", "cifar10", "--data-dir", str(tmp_path / "empty")],
           capsys, "is not a torchvision CIFAR10 folder")
    _fails([*base, "--teacher-ckpt", teacher, "--dataset", "imagenet", "--data-dir", str(tmp_path / "empty")],
           capsys, "expected an ImageFolder layout")
    _fails([*base, "--teacher-ckpt", teacher, "--teacher", "small_cnn_half"], capsys, "holds a 'small_cnn'")
    other = str(tmp_path / "t100.pt")
    save_teacher(other, build_model("small_cnn", 100, 1), "small_cnn", 100, 1, "digits", 16, 0.0, {})
    _fails([*base, "--teacher-ckpt", other], capsys, "with 100 classes")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _fails([*base, "--teacher-ckpt", str(tmp_path / "junk.pt")], capsys, "could not be read")
    _fails([*base, "--teacher-ckpt", teacher, "--student", "resnet7"], capsys, "unknown model 'resnet7'")
    _fails([*base, "--teacher-ckpt", teacher, "--adv-bound", "-1"], capsys, "--adv-bound must be > 0")
    _fails(["train-teacher", "--dataset", "digits", "--model", "nope", "--out", str(out)], capsys, "unknown model")
    assert not out.exists()


BAD_FLAGS = [  # (flag, value, what the one line must say): every distill flag that takes a value
    ("--ema-decay", "1.5", "--ema-decay must be in [0, 1]"), ("--temperature", "0", "--temperature must be > 0"),
    ("--lr-s", "-1", "--lr-s must be > 0"), ("--lr-g", "0", "--lr-g must be > 0"), ("--steps", "0", "--steps must be"),
    ("--g-pretrain-steps", "-1", "--g-pretrain-steps must be"), ("--g-steps", "0", "--g-steps must be"),
    ("--s-steps", "0", "--s-steps must be"), ("--batch-size", "0", "--batch-size must be"),
    ("--keep-ckpts", "0", "--keep-ckpts must be"), ("--eval-batch-size", "0", "--eval-batch-size must be"),
    ("--num-workers", "-1", "--num-workers must be"), ("--stop-after", "0", "--stop-after must be"),
    ("--lambda0", "-1", "--lambda0 must be"), ("--lambda1", "-1", "--lambda1 must be"),
    ("--lambda-ce", "-1", "--lambda-ce must be"), ("--lambda-bn", "-1", "--lambda-bn must be"),
    ("--img-size", "7", "--img-size must be 16, 8·2^k"), ("--nz", "0", "--nz must be"), ("--ngf", "0", "--ngf must be"),
    ("--grad-clip", "-1", "--grad-clip must be"), ("--weight-decay-s", "-1", "--weight-decay-s must be"),
    ("--log-every", "0", "--log-every must be"), ("--eval-every", "-1", "--eval-every must be"),
    ("--ckpt-every", "-1", "--ckpt-every must be"), ("--device", "tpu", "--device must be"),
    ("--preset", "mnist", "--preset must be one of"), ("--dataset", "mnist", "unknown dataset 'mnist'"),
    ("--student", "x", "unknown model 'x'"), ("--teacher", "x", "unknown model 'x'"),
    ("--compile-mode", "fast", "argument --compile-mode: invalid choice: 'fast'"),
    ("--amp", "fp8", "argument --amp: invalid choice"), ("--conditioning", "both", "argument --conditioning"),
    ("--gen-block", "x", "argument --gen-block"), ("--gen-output", "relu", "argument --gen-output"),
    ("--backend", "gpu", "argument --backend"), ("--adv-kind", "l3", "argument --adv-kind"),
    ("--optimizer-s", "lion", "argument --optimizer-s"), ("--schedule", "step", "argument --schedule"),
    ("--ema-buffers", "maybe", "argument --ema-buffers"), ("--ema-bn", "x", "argument --ema-bn"),
    ("--seed", "x", "argument --seed: invalid int value"), ("--sync-bn", "x", "unrecognized arguments: x"),
    ("--resume", "nope", "does not exist"), ("--config", "nope.yaml", "--config"),
]


@pytest.mark.parametrize("flag,value,message", BAD_FLAGS, ids=[f[0] for f in BAD_FLAGS])
def test_every_flag_rejects_bad_values_with_one_line(teacher, tmp_path, capsys, flag, value, message):
    out = tmp_path / "out"
    if flag in ("--resume", "--config"):
        value = str(tmp_path / value)
    argv = ["distill", *TINY, "--teacher-ckpt", teacher, "--out", str(out), flag, value]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks (choices, types)
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_batch_not_divisible_across_ranks(teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # checked before joining a process group
    _fails(["distill", *TINY, "--batch-size", "15", "--teacher-ckpt", teacher, "--out", str(tmp_path / "o")],
           capsys, "--batch-size 15 is not divisible by the 2 ranks")
    assert not (tmp_path / "o").exists()


def test_existing_run_is_not_overwritten(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--teacher-ckpt", teacher, "--out", str(out)]) == 0
    before = {p: os.path.getmtime(out / p) for p in os.listdir(out) if p.endswith(".pt")}
    _fails(["distill", *TINY, "--teacher-ckpt", teacher, "--out", str(out)], capsys, "already holds a run")
    assert before == {p: os.path.getmtime(out / p) for p in os.listdir(out) if p.endswith(".pt")}
    assert torch.load(out / sorted(before)[-1], weights_only=False)["step"] == 4


def test_bench_report_table_and_chart(tmp_path):
    from madfast.bench_report import write_report

    rows = [("eager", 2.0, 1.0), ("fused", 1.0, 2.0)]
    data = {"machine_info": {"torch": torch.__version__, "cpu_threads": 2},
            "benchmarks": [{"name": p, "group": "mad_iteration/x", "stats": {"mean": m},
                            "extra_info": {"provider": p, "baseline": "eager", "speedup_vs_baseline": s}}
                           for p, m, s in rows]}
    (tmp_path / "b.json").write_text(json.dumps(data))
    write_report(str(tmp_path / "b.json"), str(tmp_path / "b.md"), str(tmp_path / "b.png"))
    table = (tmp_path / "b.md").read_text()
    assert "| mad_iteration/x | fused | 1000.000 | 2.00× (eager) |" in table
    assert (tmp_path / "b.png").stat().st_size > 1000
