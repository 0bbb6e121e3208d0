"""--preset NAME: valid configs per data set, each value marked with its source; --print-config shows
the resolved config (flag > file > preset > default) and runs nothing."""

import dataclasses

import pytest
import yaml

from madfast.cli import main
from madfast.train import DistillConfig, config_from_dict
from madfast.train.presets import PRESETS, preset_sources, preset_values

SOURCES = {"paper", "reported", "practice", "ours"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_config_with_marked_sources(name):
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    values = preset_values(name, fields)
    cfg = config_from_dict(DistillConfig, values)
    assert cfg.dataset == name
    assert set(preset_sources(name).values()) <= SOURCES
    for k, v in values.items():
        assert getattr(cfg, k) == v, k
    for k in ("teacher", "student", "img_size", "batch_size", "steps", "lr_s", "lr_g", "lambda_bn", "lambda_ce", "nz"):
        assert k in values, (name, k)


def test_imagenet_scale_presets():
    assert preset_values("imagenet")["teacher"] == "resnet50" and preset_values("imagenet")["img_size"] == 224
    assert preset_values("imagenet")["lambda_bn"] == 0.05  # DeepInversion's ImageNet weight
    assert preset_sources("imagenet")["lambda_bn"] == "practice"
    assert preset_values("cifar100")["teacher"] == "cifar_resnet34"


def _printed(capsys, *argv) -> tuple[dict, dict]:
    assert main(["distill", *argv, "--print-config"]) == 0
    text = capsys.readouterr().out
    sources = {line.split(":")[0]: line.split("# ")[-1] for line in text.splitlines() if not line.startswith("#")}
    return yaml.safe_load(text), sources


def test_print_config_resolves_preset_file_and_flags(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("steps: 123\nlr_g: 0.0005\n")
    out = tmp_path / "never"
    values, sources = _printed(capsys, "--preset", "imagenet", "--config", str(f), "--batch-size", "64",
                               "--lr-g", "0.002", "--out", str(out))
    assert values == dataclasses.asdict(config_from_dict(DistillConfig, values))  # loadable as a config
    assert values["dataset"] == "imagenet" and sources["dataset"] == "preset imagenet [paper]"
    assert values["lambda_bn"] == 0.05 and sources["lambda_bn"] == "preset imagenet [practice]"
    assert values["batch_size"] == 64 and sources["batch_size"] == "flag"
    assert values["steps"] == 123 and sources["steps"] == "file"
    assert values["lr_g"] == 0.002 and sources["lr_g"] == "flag"  # flag beats file
    assert values["temperature"] == 1.0 and sources["temperature"] == "default"
    assert not out.exists()  # nothing written, no data read (there is no ImageNet here)
    # the printed YAML feeds back as --config
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(values))
    again, _ = _printed(capsys, "--config", str(tmp_path / "printed.yaml"))
    assert again == values


def test_bad_preset_fails_with_one_line(tmp_path, capsys):
    assert main(["distill", "--preset", "mnist", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--preset must be one of cifar10, cifar100, tinyimagenet" in err
    assert main(["distill", "--preset", "cifar10", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--preset cannot be combined with --resume" in err
    assert not (tmp_path / "o").exists()


def test_config_help_marks_every_algorithm_choice():
    marks = ("[paper", "[reported", "[practice", "[ours")
    first, last = "nz", "grad_clip"  # the generator, schedule, loss, EMA and optimisation fields
    names = [f.name for f in dataclasses.fields(DistillConfig)]
    for f in dataclasses.fields(DistillConfig)[names.index(first):names.index(last) + 1]:
        assert any(m in f.metadata["help"] for m in marks), f.name
