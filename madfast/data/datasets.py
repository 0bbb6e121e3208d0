"""Evaluation/teacher-training data from local folders only: digits (embedded), CIFAR-10/100
(torchvision layout), and ImageFolder layouts (TinyImageNet, ImageNet, Places365, any)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch.utils.data import Dataset

from madfast._extras import require
from madfast.data.digits import digits_dataset
from madfast.errors import DataError

__all__ = ["DatasetInfo", "DATASETS", "dataset_info", "build_dataset", "folder_index", "Normalize"]


@dataclass(frozen=True)
class DatasetInfo:
    """What the models and the generator need to know about a data set."""
    name: str
    num_classes: int  # 0: read from the folder
    channels: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASETS = {
    "digits": DatasetInfo("digits", 10, 1, 16, (0.5,), (0.5,)),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": DatasetInfo("tinyimagenet", 200, 3, 64, *_IMAGENET_STATS),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, *_IMAGENET_STATS),
    "places365": DatasetInfo("places365", 365, 3, 224, *_IMAGENET_STATS),
    "imagefolder": DatasetInfo("imagefolder", 0, 3, 224, *_IMAGENET_STATS),
}
_FOLDER_SPLITS = {"train": "train", "test": "val"}
# ImageFolder layouts: their image size and normalisation are conventions, not facts of the data, so
# a timm teacher's pretrained config replaces them (CIFAR and digits fix theirs).
_FOLDER_DATASETS = ("tinyimagenet", "imagenet", "places365", "imagefolder")


class Normalize(torch.nn.Module):
    """(x − mean) / std per channel: maps [0, 1] images to what the classifiers see."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def dataset_info(name: str, data_dir: str | None = None, img_size: int | None = None) -> DatasetInfo:
    """The data set's facts; for an ImageFolder the class count is read from ``data_dir``."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    if name == "digits" and img_size is not None:
        info = replace(info, img_size=img_size)
    if name in _FOLDER_DATASETS:
        classes = _folder_classes(name, data_dir, "test")
        info = replace(info, num_classes=len(classes), img_size=img_size or info.img_size)
    return info


def _require_dir(name: str, data_dir: str | None) -> str:
    if not data_dir:
        raise DataError(f"dataset {name!r} needs --data-dir (a local folder; nothing is downloaded)")
    if not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir!r} does not exist or is not a folder")
    return data_dir


def _folder_classes(name: str, data_dir: str | None, split: str) -> list[str]:
    root = os.path.join(_require_dir(name, data_dir), _FOLDER_SPLITS[split])
    if not os.path.isdir(root):
        raise DataError(f"dataset {name!r}: expected an ImageFolder layout {root}/<class>/<image>, "
                        f"but {root!r} is missing")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise DataError(f"dataset {name!r}: {root!r} has no class folders")
    return classes


def folder_index(dataset: Dataset):
    """(classes, samples) of an ImageFolder data set — what ``build_dataset(index=...)`` takes to
    build the same data set without scanning its folder (other ranks); None for other data sets."""
    samples = getattr(dataset, "samples", None)
    return (list(dataset.classes), list(samples)) if samples is not None else None


def build_dataset(name: str, split: str, data_dir: str | None = None, img_size: int | None = None,
                  augment: bool = False, index=None) -> Dataset:
    """Images in [0, 1] (normalisation is part of the model input pipeline, see ``Normalize``).

    split: "train" or "test" (CIFAR's test set; the folder "val" of an ImageFolder layout).
    augment: random crop + flip for teacher training (not for digits, whose classes are not
    mirror-symmetric).
    index: an ImageFolder's ``folder_index`` from another process (its folder is then not scanned).
    """
    if split not in _FOLDER_SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    info = dataset_info(name, data_dir, img_size)
    if name == "digits":
        return digits_dataset(split, info.img_size)
    datasets = require("torchvision.datasets", f"the {name} data set")
    T = require("torchvision.transforms", f"the {name} data set")

    if name in ("cifar10", "cifar100"):
        root = _require_dir(name, data_dir)
        tf = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            return cls(root, train=split == "train", download=False, transform=T.Compose([*tf, T.ToTensor()]))
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
            raise DataError(f"dataset {name!r}: {root!r} is not a torchvision {cls.__name__} folder "
                            f"(expected {cls.base_folder}/ with its batch files): {e}") from None
    _folder_classes(name, data_dir, split)
    size = info.img_size
    if augment:
        tf = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        tf = [T.Resize(size * 8 // 7 if size >= 224 else size), T.CenterCrop(size)]
    root, transform = os.path.join(data_dir, _FOLDER_SPLITS[split]), T.Compose([*tf, T.ToTensor()])
    if index is not None:  # an ImageFolder over the known (classes, samples): no directory scan
        class ListedImageFolder(datasets.ImageFolder):
            def find_classes(self, directory):
                return index[0], {c: i for i, c in enumerate(index[0])}

            def make_dataset(self, *args, **kwargs):
                return list(index[1])

        return ListedImageFolder(root, transform=transform)
    try:
        return datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"dataset {name!r}: {e}") from None
