"""build_model(name, ...): madfast's CIFAR/demo nets by name, any torchvision.models name, or
``timm:NAME`` for any timm model."""

from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from madfast._extras import require
from madfast.errors import UsageError
from madfast.models.cifar_resnet import cifar_resnet18, cifar_resnet34
from madfast.models.from_timm import build_timm_model, is_timm
from madfast.models.small_cnn import SmallCNN
from madfast.models.wrn import wrn

__all__ = ["build_model", "MODELS", "model_names"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet18": cifar_resnet18,
    "cifar_resnet34": cifar_resnet34,
    "wrn16_1": partial(wrn, 16, 1),
    "wrn16_2": partial(wrn, 16, 2),
    "wrn40_1": partial(wrn, 40, 1),
    "wrn40_2": partial(wrn, 40, 2),
    "small_cnn": partial(SmallCNN, width=32),
    "small_cnn_half": partial(SmallCNN, width=16),
}


def _torchvision_names() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    """madfast's own names, then torchvision's classification models."""
    return list(MODELS) + _torchvision_names()


def build_model(name: str, num_classes: int, channels: int = 3, img_size: int | None = None) -> nn.Module:
    """A freshly initialised classifier. torchvision and timm models are built without weights
    (nothing is downloaded); torchvision's take 3-channel input. ``img_size`` sizes the timm models
    whose input size is fixed (ViTs); the others take any size."""
    if is_timm(name):
        return build_timm_model(name, num_classes, channels, img_size)
    if name in MODELS:
        return MODELS[name](num_classes=num_classes, channels=channels)
    torchvision = require("torchvision", f"model {name!r} (not one of madfast's {', '.join(MODELS)})")
    if name in _torchvision_names():
        if channels != 3:
            raise UsageError(f"model {name!r} (torchvision) takes 3-channel images, the data has {channels}")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise UsageError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}, "
                     "a torchvision.models classification name (e.g. resnet18, resnet50) or timm:NAME")
