"""timm:NAME teachers and students, safetensors weights, timm's local caches, teachers without BatchNorm."""

from __future__ import annotations

import csv
import json
import subprocess
import os
import sys

import pytest
import torch

from madfast.data import dataset_info
from madfast.errors import CheckpointError, MissingExtraError, UsageError
from madfast.models import build_model
from madfast.models.checkpoints import load_teacher_weights
from madfast.models.from_timm import timm_data_info, timm_hub_weights_path
from madfast.train import DistillConfig, MADTask, TeacherConfig, distill, train_teacher
from madfast.train.task import bn_prior_weight
from mad_helpers import run_command

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ---- building ----


def test_a_fixed_size_timm_model_is_built_for_the_data():
    """ViTs size their position table by img_size; a 32 px digits ViT has (32/16)² + 1 positions."""
    vit = build_model("timm:test_vit", 10, 1, 32)
    assert vit.pos_embed.shape[1] == (32 // vit.patch_embed.patch_size[0]) ** 2 + vit.num_prefix_tokens
    assert vit(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    resnet = build_model("timm:test_resnet", 7, 1, 32)  # no img_size argument: any size
    assert resnet(torch.randn(2, 1, 24, 24)).shape == (2, 7)


def test_an_unknown_timm_name_and_a_missing_timm_are_one_line(monkeypatch):
    with pytest.raises(UsageError, match=r"timm:no_such_net.*has no model 'no_such_net'"):
        build_model("timm:no_such_net", 10)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingExtraError, match=r"model 'timm:test_vit' needs timm.*madfast\[timm\]"):
        build_model("timm:test_vit", 10)


def test_pretrained_config_sizes_and_normalises_folder_data_only(tmp_path):
    for split in ("val",):
        for c in ("a", "b"):
            os.makedirs(tmp_path / split / c)
    folder = dataset_info("imagefolder", str(tmp_path))
    cfg = timm.models.get_pretrained_cfg("test_vit")
    got = timm_data_info(folder, "timm:test_vit", img_size_given=False)
    assert (got.img_size, got.mean, got.std, got.num_classes) == (cfg.input_size[-1], cfg.mean, cfg.std, 2)
    assert timm_data_info(dataset_info("imagefolder", str(tmp_path), 96), "timm:test_vit", True).img_size == 96
    digits = dataset_info("digits", img_size=32)  # the data set fixes its size and normalisation
    assert timm_data_info(digits, "timm:test_vit", False) == digits
    assert timm_data_info(folder, "resnet18", False) == folder


# ---- weights: safetensors, hub caches ----


def test_safetensors_weights_load_like_a_state_dict(tmp_path):
    src = build_model("timm:test_resnet", 10, 1)
    path = str(tmp_path / "w.safetensors")
    safetensors_torch.save_file({f"module.{k}": v for k, v in _state(src).items()}, path)  # DDP prefix too
    dst = build_model("timm:test_resnet", 10, 1)
    assert load_teacher_weights(path, dst, "timm:test_resnet", 10, 1)["format"] == "state_dict"
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    wrong = build_model("timm:test_resnet", 5, 1)
    with pytest.raises(CheckpointError, match=r"w\.safetensors.*fc\.weight.*shape \(10, .*wants \(5, "):
        load_teacher_weights(path, wrong, "timm:test_resnet", 5, 1)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(open(path, "rb").read()[:200])
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*could not be read as safetensors"):
        load_teacher_weights(str(bad), wrong, "timm:test_resnet", 5, 1)


def _hf_cache(root, repo: str, files: dict) -> None:
    """The Hugging Face hub cache layout: refs/main names a snapshot folder holding the files."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for name, state in files.items():
        safetensors_torch.save_file(state, str(snap / name))


def test_hub_weights_come_from_the_local_cache_never_the_network(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    with pytest.raises(CheckpointError, match=r"not on this machine.*nothing is downloaded.*timm/test_resnet"):
        timm_hub_weights_path("timm:test_resnet")
    src = build_model("timm:test_resnet", 1000, 3)
    _hf_cache(tmp_path / "hf", timm.models.get_pretrained_cfg("test_resnet").hf_hub_id, {"model.safetensors": _state(src)})
    dst = build_model("timm:test_resnet", 1000, 3)
    load_teacher_weights("hub", dst, "timm:test_resnet", 1000, 3)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    with pytest.raises(CheckpointError, match=r"hub is for timm:NAME teachers, not 'resnet18'"):
        load_teacher_weights("hub", dst, "resnet18", 1000, 3)


# ---- teachers without BatchNorm ----


def test_the_bn_prior_is_off_for_a_teacher_without_batch_norm():
    vit, resnet = build_model("timm:test_vit", 10, 1, 32), build_model("timm:test_resnet", 10, 1)
    assert bn_prior_weight(None, vit, "timm:test_vit") == 0.0
    assert bn_prior_weight(None, resnet, "timm:test_resnet") == 1.0
    assert bn_prior_weight(0.0, vit, "timm:test_vit") == 0.0
    assert bn_prior_weight(0.05, resnet, "timm:test_resnet") == 0.05
    with pytest.raises(UsageError, match=r"--lambda-bn 0\.5 needs a teacher with BatchNorm2d.*'timm:test_vit' has none"):
        bn_prior_weight(0.5, vit, "timm:test_vit")


def test_mad_with_a_vit_teacher_runs_on_the_adversarial_and_ce_terms(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = build_model("timm:test_vit", 10, 1, 32)
    path = str(tmp_path / "vit.safetensors")
    safetensors_torch.save_file(_state(teacher), path)
    cfg = DistillConfig(dataset="digits", img_size=32, teacher="timm:test_vit", teacher_ckpt=path,
                        student="small_cnn_half", nz=16, ngf=8, batch_size=8, steps=2, g_pretrain_steps=1,
                        s_steps=1, out=str(tmp_path / "run"), log_every=1, eval_every=0, ckpt_every=0,
                        check_teacher=False, tensorboard=False, progress=False, num_workers=0, device="cpu")
    distill(cfg)
    out = capsys.readouterr().out
    assert out.count("'timm:test_vit' has no BatchNorm2d layers, so the BN-statistics prior is off") == 1
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    g = [r for r in rows if r["g_ce"]]
    assert g and all(float(r["g_bn"]) == 0.0 and float(r["g_ce"]) > 0 for r in g)
    with pytest.raises(UsageError, match=r"'timm:test_vit' has none"):
        distill(DistillConfig(**{**cfg.__dict__, "lambda_bn": 1.0, "out": str(tmp_path / "run2")}))
    assert not os.path.exists(tmp_path / "run2" / "config.json")


def test_the_cli_refuses_lambda_bn_for_a_vit_teacher_in_one_line(tmp_path):
    teacher = build_model("timm:test_vit", 10, 1, 32)
    path = str(tmp_path / "vit.safetensors")
    safetensors_torch.save_file(_state(teacher), path)
    r = subprocess.run([sys.executable, "-m", "madfast", "distill", "--dataset", "digits", "--img-size", "32",
                        "--teacher", "timm:test_vit", "--teacher-ckpt", path, "--lambda-bn", "1", "--device", "cpu",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if "madfast" in line and "lambda-bn" in line]
    assert len(lines) == 1 and "'timm:test_vit' has none" in lines[0], r.stderr[-2000:]


# ---- end to end ----


@pytest.mark.slow
def test_timm_resnet_teacher_as_safetensors_distilled_into_a_timm_student(tmp_path):
    """A timm ResNet trained on digits at 32 px, saved as safetensors, distilled into another timm
    ResNet from the command line; `madfast eval` of the run reports the accuracy distill reported."""
    train_teacher(TeacherConfig(dataset="digits", img_size=32, model="timm:test_resnet", epochs=3, batch_size=64,
                                lr=0.05, device="cpu", out=str(tmp_path / "teacher"), progress=False, num_workers=0))
    saved = torch.load(tmp_path / "teacher" / "teacher.pt", weights_only=False)
    weights = str(tmp_path / "teacher.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in saved["state_dict"].items()}, weights)
    run = str(tmp_path / "run")
    run_command([sys.executable, "-m", "madfast", "distill", "--dataset", "digits", "--img-size", "32",
                 "--teacher", "timm:test_resnet", "--teacher-ckpt", weights, "--student", "timm:test_resnet",
                 "--nz", "32", "--ngf", "16", "--batch-size", "64", "--steps", "60", "--g-pretrain-steps", "10",
                 "--s-steps", "5", "--eval-every", "60", "--device", "cpu", "--no-progress", "--no-tensorboard",
                 "--num-workers", "0", "--out", run], 600)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["teacher_acc"] > 90
    # chance is 10 %; 100 steps reached 96 % of a 97.6 % teacher on a 2-core EPYC
    assert summary["student_acc"] > 50, summary
    stdout, _ = run_command([sys.executable, "-m", "madfast", "eval", run], 300)
    assert json.loads(stdout.strip().splitlines()[-1])["top1"] == pytest.approx(summary["student_acc"], abs=1e-6)
    stdout, _ = run_command([sys.executable, "-m", "madfast", "eval", weights, "--model", "timm:test_resnet",
                             "--dataset", "digits", "--img-size", "32"], 300)
    assert json.loads(stdout.strip().splitlines()[-1])["top1"] == pytest.approx(summary["teacher_acc"], abs=1e-6)
