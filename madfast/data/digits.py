"""The demo's embedded data: scikit-learn's 8×8 digits (shipped inside that package), upsampled."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from madfast._extras import require

__all__ = ["digits_dataset", "DIGITS_TEST_FRACTION"]

DIGITS_TEST_FRACTION = 0.25  # fixed stratified split, random_state 0


def digits_dataset(split: str, img_size: int = 16) -> TensorDataset:
    """(images, labels): 1×img_size×img_size floats in [0, 1] (bilinear upsampling of the 8×8
    originals, values 0–16), 1347 train / 450 test images of 10 classes."""
    sklearn_datasets = require("sklearn.datasets", "the digits data set")
    train_test_split = require("sklearn.model_selection", "the digits data set").train_test_split

    digits = sklearn_datasets.load_digits()
    idx_train, idx_test = train_test_split(range(len(digits.target)), test_size=DIGITS_TEST_FRACTION,
                                           stratify=digits.target, random_state=0)
    idx = idx_train if split == "train" else idx_test
    x = torch.tensor(digits.images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=True).clamp_(0, 1)
    return TensorDataset(x, torch.tensor(digits.target[idx], dtype=torch.long))
