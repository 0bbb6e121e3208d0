"""timm models as ``timm:NAME`` teachers and students: built without weights (nothing is fetched),
sized to the data, with weights from a file or from timm's local caches (``--teacher-ckpt hub``)."""

from __future__ import annotations

import inspect
import os
from dataclasses import replace

import torch
from torch import nn

from madfast._extras import require
from madfast.data.datasets import _FOLDER_DATASETS
from madfast.errors import CheckpointError, UsageError

__all__ = ["PREFIX", "is_timm", "build_timm_model", "timm_data_info", "timm_hub_weights_path"]

PREFIX = "timm:"


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm(name: str):
    timm = require("timm", f"model {name!r}", extra="timm")
    arch = name[len(PREFIX):]
    if not timm.is_model(arch):
        raise UsageError(f"model {name!r}: timm {timm.__version__} has no model {arch!r} "
                         f"(timm.list_models('*{arch.split('.')[0][:8]}*') lists the close ones)")
    return timm, arch


def build_timm_model(name: str, num_classes: int, channels: int, img_size: int | None = None) -> nn.Module:
    """``timm.create_model`` without pretrained weights, with the data's classes and channels and,
    for models with a fixed input size, its image side."""
    timm, arch = _timm(name)
    kwargs = {"num_classes": num_classes, "in_chans": channels}
    if img_size:
        with torch.device("meta"):  # an instance that allocates nothing, to read its class's arguments
            cls = type(timm.create_model(arch, pretrained=False))
        if "img_size" in inspect.signature(cls.__init__).parameters:  # ViTs size their position table by it
            kwargs["img_size"] = img_size
    return timm.create_model(arch, pretrained=False, **kwargs)


def _pretrained_cfg(name: str):
    timm, arch = _timm(name)
    return timm.models.get_pretrained_cfg(arch)


def timm_data_info(info, name: str, img_size_given: bool):
    """``info`` (a DatasetInfo) with the image side and mean/std of timm model ``name``'s pretrained
    config where the data set does not fix them (folder data sets; an --img-size always wins)."""
    if not is_timm(name) or info.name not in _FOLDER_DATASETS:
        return info
    cfg = _pretrained_cfg(name)
    if cfg is None:
        return info
    size = info.img_size if img_size_given or not cfg.input_size else int(cfg.input_size[-1])
    mean, std = tuple(cfg.mean or info.mean), tuple(cfg.std or info.std)
    if len(mean) != info.channels:
        mean, std = info.mean, info.std
    return replace(info, img_size=size, mean=mean, std=std)


def timm_hub_weights_path(name: str) -> str:
    """The already-downloaded weights file of timm model ``name`` (``--teacher-ckpt hub``): the
    Hugging Face hub cache first, then torch.hub's checkpoints folder; never fetched."""
    cfg = _pretrained_cfg(name)
    if cfg is None:
        raise CheckpointError(f"--teacher-ckpt hub: timm has no pretrained weights for {name!r}")
    looked = []
    if cfg.hf_hub_id:
        hub = require("huggingface_hub", "--teacher-ckpt hub", extra="timm")
        repo = cfg.hf_hub_id.split("@")[0]
        for filename in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"):
            if filename:
                path = hub.try_to_load_from_cache(repo, filename)
                if isinstance(path, str) and os.path.isfile(path):
                    return path
        looked.append(f"{repo} in the Hugging Face cache ({hub.constants.HF_HUB_CACHE})")
    if cfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
        if os.path.isfile(path):
            return path
        looked.append(path)
    raise CheckpointError(f"--teacher-ckpt hub: the weights of {name!r} are not on this machine (nothing is "
                          f"downloaded; looked for {' and '.join(looked) or 'no published file'})")
