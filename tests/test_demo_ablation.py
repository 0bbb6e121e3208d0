"""`madfast demo --ablation`: MAD, no-EMA and no-adversarial on the same seeds, one table."""

import json
from dataclasses import replace

import pytest

from madfast.cli import main
from madfast.train import demo
from madfast.train.checkpoint import load_checkpoint


DEMO_CONFIGS = demo.demo_configs


def tiny_demo_configs(out, seed=0):
    """The demo's configs at toy sizes (seconds, not minutes)."""
    teacher, student = DEMO_CONFIGS(out, seed)
    teacher = replace(teacher, epochs=1)
    student = replace(student, nz=16, ngf=8, batch_size=16, steps=2, g_pretrain_steps=1, s_steps=1, eval_every=0,
                      log_every=1, tensorboard=False)
    return teacher, student


@pytest.fixture
def tiny_demo(monkeypatch):
    monkeypatch.setattr(demo, "demo_configs", tiny_demo_configs)


@pytest.mark.slow
def test_ablation_runs_each_variant_on_the_seed(tiny_demo, tmp_path, capsys):
    """One seed end to end (the spread over several is format_ablation's, below)."""
    assert main(["demo", "--ablation", "--seeds", "3", "--steps", "2", "--shift", "hard", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    saved = json.load(open(tmp_path / "ablation.json"))
    assert saved["seeds"] == [3] and set(saved["runs"]) == {"MAD", "no-EMA", "no-adversarial"}
    assert saved["shift"] == "hard" and "shift hard (s_steps 1, lr_g 0.01)" in table
    for name, row in saved["summary"].items():
        acc = saved["runs"][name]["3"]["student_acc"]
        assert row["mean"] == acc and row["std"] == 0 and row["n"] == 1
        assert f"{name:<16}{acc:>9.2f} ± 0.00" in table
    # each variant really is what its name says, from the same teacher
    for seed in (3,):
        base = tmp_path / f"seed-{seed}"
        cfgs = {name: load_checkpoint(str(base / name))["config"] for name in demo.ABLATIONS}
        assert cfgs["MAD"]["ema"] and not cfgs["no-EMA"]["ema"] and cfgs["no-adversarial"]["ema"]
        assert cfgs["no-adversarial"]["adv_bound"] < 1e-9 and cfgs["MAD"]["adv_bound"] == cfgs["no-EMA"]["adv_bound"] == 3.0
        assert {c["seed"] for c in cfgs.values()} == {seed}
        # the hard shift on every variant, on top of the tiny demo's settings
        assert {(c["s_steps"], c["lr_g"]) for c in cfgs.values()} == {(1, 1e-2)}
        assert {c["teacher_ckpt"] for c in cfgs.values()} == {str(base / "teacher" / "teacher.pt")}


def test_format_ablation_reports_mean_std_and_range():
    runs = {"MAD": {0: {"student_acc": 90.0}, 1: {"student_acc": 94.0}}, "no-EMA": {0: {"student_acc": 80.0},
                                                                                    1: {"student_acc": 80.0}}}
    result = {"seeds": [0, 1], "steps": 7, "runs": runs,
              "summary": {k: demo._spread([r["student_acc"] for r in v.values()]) for k, v in runs.items()}}
    text = demo.format_ablation(result)
    assert "92.00 ± 2.83" in text and "90.0–94.0" in text and "80.00 ± 0.00" in text and "7 adversarial" in text


def test_shift_needs_ablation(capsys, tmp_path):
    assert main(["demo", "--shift", "hard", "--out", str(tmp_path)]) == 2
    assert "--shift" in capsys.readouterr().err


def test_run_ablation_rejects_unknown_shift(tmp_path):
    with pytest.raises(ValueError, match="shift"):
        demo.run_ablation(str(tmp_path), [0], shift="harder")


@pytest.mark.parametrize("seeds", ["", "0,x", "1,1"])
def test_bad_seeds_are_a_usage_error(seeds, capsys, tmp_path):
    assert main(["demo", "--ablation", "--seeds", seeds, "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err


@pytest.mark.parametrize("ratio,code", [(0.95, 0), (0.90, 0), (0.899, 1)])
def test_demo_exit_status_is_its_pass_condition(monkeypatch, tmp_path, capsys, ratio, code):
    """`madfast demo` fails (exit 1, one line naming the ratio) when the student is below 0.90 of the teacher."""
    def fake_run_demo(out, seed=0, progress=True, distill_overrides=None):
        return {"teacher_acc": 100.0, "student_acc": 100.0 * ratio, "ratio": ratio, "seconds": 1.0,
                "passed": ratio >= demo.PASS_RATIO}
    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--no-progress", "--out", str(tmp_path)]) == code
    err = capsys.readouterr().err
    assert (f"reached {ratio:.3f} of the teacher" in err) == bool(code)
