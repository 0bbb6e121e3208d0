"""The classifier registry: every name builds and classifies; unknown names fail clearly."""

import pytest
import torch

from madfast.errors import UsageError
from madfast.models import MODELS, build_model, model_names

PARAMS = {"cifar_resnet18": 11_173_962, "cifar_resnet34": 21_282_122, "wrn16_1": 175_066, "wrn40_2": 2_243_546}


@pytest.mark.parametrize("name", list(MODELS))
def test_madfast_models(name):
    channels = 1 if name.startswith("small") else 3
    m = build_model(name, num_classes=7, channels=channels).eval()
    assert m(torch.randn(2, channels, 16 if channels == 1 else 32, 16 if channels == 1 else 32)).shape == (2, 7)
    if name in PARAMS:  # the standard architectures of DFKD papers, at 10 classes
        assert sum(p.numel() for p in build_model(name, 10).parameters()) == PARAMS[name]


def test_torchvision_models_by_name():
    assert "resnet50" in model_names()
    m = build_model("resnet18", num_classes=5).eval()
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(UsageError, match="3-channel"):
        build_model("resnet18", num_classes=5, channels=1)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'resnet7'"):
        build_model("resnet7", 10)
