"""ImageNet shape end to end on CPU: a 1000-class ImageFolder made here, a torchvision ResNet-18
teacher from a plain saved state dict, the imagenet preset scaled down to 64 px, a 2-process gloo
torchrun distill with sharded evaluation and the sample grid, then a resume on one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from madfast.models import build_model
from madfast.train.checkpoint import load_checkpoint
from mad_helpers import run_command

CLASSES = 1000


def _image_folder(root) -> str:
    """val/<1000 classes>/ with one tiny random image each, two in class 0 (1001 images: two ranks'
    shards differ in size, and a padding sampler would count an image twice); resized to 64 px when read."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (CLASSES, 8, 8, 3), generator=g, dtype=torch.uint8).numpy()
    for k in range(CLASSES):
        d = os.path.join(root, "val", f"n{k:08d}")
        os.makedirs(d)
        Image.fromarray(pixels[k]).save(os.path.join(d, "0.png"))
    Image.fromarray(pixels[1]).save(os.path.join(root, "val", f"n{0:08d}", "1.png"))
    return str(root)


def _run(cmd, timeout=240) -> subprocess.CompletedProcess:
    out, err = run_command(cmd, timeout)
    return subprocess.CompletedProcess(cmd, 0, out, err)


@pytest.mark.slow
def test_imagenet_shape_rehearsal(tmp_path):
    data = _image_folder(tmp_path / "imagenet")
    torch.manual_seed(0)
    teacher = tmp_path / "resnet18.pth"
    model = build_model("resnet18", CLASSES)
    with torch.no_grad():  # always class 0: top-1 is 2 of 1001 images, exactly (a per-rank count is not)
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[0] = 1.0
    torch.save(model.state_dict(), teacher)  # torchvision's own layout, plain
    out = tmp_path / "run"
    small = ["--img-size", "64", "--teacher", "resnet18", "--teacher-ckpt", str(teacher), "--data-dir", data,
             "--nz", "16", "--ngf", "8", "--batch-size", "8", "--steps", "2", "--g-pretrain-steps", "1",
             "--s-steps", "1", "--eval-every", "2", "--log-every", "1", "--eval-batch-size", "200", "--num-workers", "0",
             "--device", "cpu", "--no-tensorboard", "--no-progress", "--ckpt-every", "1", "--out", str(out)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    r = _run([*torchrun, "-m", "madfast", "distill", "--preset", "imagenet", *small, "--stop-after", "2"])
    assert r.stdout.count("stopped at step 2/3") == 1  # rank 0 alone reports
    state = load_checkpoint(str(out))
    assert state["step"] == 2 and len(state["noise"]) == 2
    assert state["config"]["lambda_bn"] == 0.05 and state["config"]["dataset"] == "imagenet"  # the preset
    two_rank = json.load(open(out / "summary.json"))
    # sharded evaluation: every image counted once, the same accuracy as one process over all of them
    r = _run([sys.executable, "-m", "madfast", "eval", str(teacher), "--model", "resnet18", "--dataset", "imagenet",
              "--data-dir", data, "--img-size", "64", "--device", "cpu", "--num-workers", "0"])
    one_rank = json.loads(r.stdout)
    assert two_rank["teacher_acc"] == pytest.approx(100 * 2 / 1001)
    assert one_rank["top1"] == pytest.approx(100 * 2 / 1001)
    assert 0 <= two_rank["student_acc"] <= 100
    # resume on one process: not bit-exact, warned, and it finishes
    r = _run([sys.executable, "-m", "madfast", "distill", "--resume", str(out), "--no-progress", "--no-check-teacher"])
    assert "finished" in r.stdout and "continued on 1; noise streams re-seeded" in r.stderr
    state = load_checkpoint(str(out))
    assert state["step"] == 3 and len(state["noise"]) == 1
    summary = json.load(open(out / "summary.json"))
    assert summary["finished"] and 0 <= summary["student_acc"] <= 100
    assert Image.open(out / "samples.png").size == (8 * 65 + 1, 16 * 65 + 1)  # 16 of 1000 classes, G | G̃
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and all("nan" not in row and "inf" not in row for row in rows)
