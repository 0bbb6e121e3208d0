"""--teacher-ckpt takes teacher weights from anywhere; each layout is checked by the function the
loaded network computes, against the network that wrote the file."""

import argparse
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from madfast.cli import main
from madfast.errors import CheckpointError
from madfast.models import build_model
from madfast.models.checkpoints import load_teacher_weights
from madfast.train.checkpoint import load_checkpoint
from mad_helpers import tiny_teacher


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so that a misplaced BN tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _same_function(a: nn.Module, b: nn.Module, size: int = 32) -> None:
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ya, yb = a.eval()(x).double(), b.eval()(x).double()
    assert ya.abs().max() > 1e-3
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)


def _load(path, name, num_classes=10, channels=3):
    model = build_model(name, num_classes, channels)
    meta = load_teacher_weights(str(path), model, name, num_classes, channels)
    return model, meta


@pytest.fixture(scope="module")
def tv_resnet18():
    torch.manual_seed(0)
    return _randomise_bn(build_model("resnet18", 10))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return _randomise_bn(build_model("small_cnn", 10, 3))


WRAPPERS = {
    "plain": lambda sd, m: sd,
    "state_dict": lambda sd, m: {"state_dict": sd, "epoch": 90, "best_acc1": 71.2},
    "model": lambda sd, m: {"model": sd, "optimizer": {"state": {}}},
    "nested": lambda sd, m: {"model": {"state_dict": sd}},
    "ddp": lambda sd, m: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    "compiled-ddp": lambda sd, m: {f"module._orig_mod.{k}": v for k, v in sd.items()},
    "whole-module": lambda sd, m: m,
    "with-namespace": lambda sd, m: {"state_dict": sd, "args": argparse.Namespace(lr=0.1)},  # not weights_only
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_state_dict_in_every_wrapper(small, tmp_path, wrapper):
    path = tmp_path / "t.pth"
    torch.save(WRAPPERS[wrapper](small.state_dict(), small), path)
    model, meta = _load(path, "small_cnn")
    assert meta["format"] == "state_dict" and meta["test_acc"] is None
    _same_function(small, model, size=16)


def test_published_torchvision_layout_1000_classes_and_the_cache_name(tmp_path, monkeypatch):
    """torchvision:WEIGHTS reads the file torchvision caches (never downloads)."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(CheckpointError, match=r"resnet18-f37072fd\.pth' is missing \(nothing is downloaded"):
        _load("torchvision:IMAGENET1K_V1", "resnet18", 1000)
    with pytest.raises(CheckpointError, match="has no weights 'V9'.*IMAGENET1K_V1"):
        _load("torchvision:V9", "resnet18", 1000)
    torch.manual_seed(0)
    src = _randomise_bn(torchvision.models.resnet18())  # torchvision's own constructor, 1000 classes
    cache = os.path.join(str(tmp_path / "hub"), "hub", "checkpoints")  # torch.hub.get_dir() is $TORCH_HOME/hub
    os.makedirs(cache)
    torch.save(src.state_dict(), os.path.join(cache, os.path.basename(weights.url)))
    for spec in ("torchvision:IMAGENET1K_V1", "torchvision:"):  # "torchvision:" is DEFAULT
        model, _ = _load(spec, "resnet18", 1000)
        _same_function(src, model, size=64)


def test_mismatches_name_the_first_offending_key(tv_resnet18, tmp_path):
    sd = tv_resnet18.state_dict()
    torch.save(sd, tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match=r"'fc\.weight' has shape \(10, 512\), the model wants \(1000, 512\)"):
        _load(tmp_path / "t.pth", "resnet18", 1000)
    torch.save({k: v for k, v in sd.items() if k != "layer2.0.bn1.running_var"}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"lacks 'layer2\.0\.bn1\.running_var' \(1 missing, 0 unexpected"):
        _load(tmp_path / "m.pth", "resnet18")
    torch.save({**sd, "head.weight": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key 'head\.weight'"):
        _load(tmp_path / "x.pth", "resnet18")
    torch.save({"epoch": 3, "acc": 0.5}, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match=r"holds no state dict of tensors \(top-level keys: epoch, acc\)"):
        _load(tmp_path / "e.pth", "resnet18")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="could not be read"):
        _load(tmp_path / "junk.pth", "resnet18")
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(tmp_path / "none.pth", "resnet18")
    with pytest.raises(CheckpointError, match="is required"):
        _load("", "resnet18")


# --- CMI / Fast-Datafree layouts, written here from their published model code (zju-vipa/CMI) ---

class _CMIBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class _CMIResNet(nn.Module):
    """DAFL/CMI CIFAR ResNet: the classifier is called ``linear``."""

    def __init__(self, blocks, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        cin, layers = 64, []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            layers.append(nn.Sequential(*[_CMIBlock(cin if j == 0 else planes, planes, 2 if i and not j else 1)
                                          for j in range(n)]))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class _XBlock(nn.Module):
    """xternalz WideResNet block (CMI's wresnet.py): pre-activation, ``convShortcut`` on change."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return (x if self.equal else self.convShortcut(x)) + out


class _XNetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[_XBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class _XWideResNet(nn.Module):
    def __init__(self, depth, width, num_classes=10):
        super().__init__()
        n, w = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.block1 = _XNetworkBlock(n, w[0], w[1], 1)
        self.block2 = _XNetworkBlock(n, w[1], w[2], 2)
        self.block3 = _XNetworkBlock(n, w[2], w[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(w[3]), nn.ReLU()
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@pytest.mark.parametrize("name,make", [
    ("cifar_resnet18", lambda: _CMIResNet((2, 2, 2, 2))),
    ("cifar_resnet34", lambda: _CMIResNet((3, 4, 6, 3), num_classes=100)),
    ("wrn16_2", lambda: _XWideResNet(16, 2)),
    ("wrn40_1", lambda: _XWideResNet(40, 1, num_classes=100)),
])
def test_cmi_fast_datafree_cifar_checkpoints(tmp_path, name, make):
    torch.manual_seed(0)
    src = _randomise_bn(make())
    classes = src.linear.out_features if hasattr(src, "linear") else src.fc.out_features
    torch.save({"epoch": 200, "arch": name, "state_dict": src.state_dict(), "best_acc1": 0.95}, tmp_path / "cmi.pth")
    model, _ = _load(tmp_path / "cmi.pth", name, classes)
    _same_function(src, model)


# --- through the command line ---

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher"))


def test_eval_and_distill_take_a_foreign_teacher_file(teacher, tmp_path, capsys):
    state = load_checkpoint(teacher)
    foreign = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state["state_dict"].items()}}, foreign)
    assert main(["eval", teacher]) == 0
    own = json.loads(capsys.readouterr().out)
    assert main(["eval", str(foreign), "--model", "small_cnn", "--dataset", "digits"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == own["top1"] > 80
    assert main(["eval", str(foreign), "--model", "small_cnn"]) == 2
    assert "--model needs --dataset" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["distill", "--dataset", "digits", "--teacher", "small_cnn", "--teacher-ckpt", str(foreign),
                 "--student", "small_cnn_half", "--nz", "16", "--ngf", "8", "--batch-size", "16", "--steps", "1",
                 "--g-pretrain-steps", "1", "--s-steps", "1", "--no-tensorboard", "--device", "cpu",
                 "--num-workers", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"test accuracy {own['top1']:.2f}% (before distilling)" in printed
    assert json.load(open(out / "summary.json"))["teacher_acc"] == pytest.approx(own["top1"])
