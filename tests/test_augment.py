"""Per-sample random resized crop + flip of synthetic samples, against closed forms on ramp images."""

import pytest
import torch

from madfast.train import distill
from madfast.train.augment import random_resized_crop_flip, resized_crop_flip
from mad_helpers import tiny_config, tiny_teacher

W = 8


def _ramp(n=2) -> torch.Tensor:
    """Pixel (i, j) of image k holds j + 10·k: linear along x, so bilinear resampling is exact."""
    j = torch.arange(W, dtype=torch.float64)
    return (j.view(1, 1, 1, W) + 10.0 * torch.arange(n, dtype=torch.float64).view(n, 1, 1, 1)).expand(n, 1, W, W).clone()


def _params(n, w=1.0, h=1.0, cx=0.0, cy=0.0, flip=False):
    full = lambda v: torch.full((n,), v, dtype=torch.float64)  # noqa: E731
    return full(w), full(h), full(cx), full(cy), torch.full((n,), flip)


def test_identity_and_flip_are_exact():
    x = torch.randn(3, 2, W, W, dtype=torch.float64)
    torch.testing.assert_close(resized_crop_flip(x, *_params(3)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(resized_crop_flip(x, *_params(3, flip=True)), x.flip(-1), rtol=0, atol=1e-12)


def test_crop_of_the_right_half_resamples_the_ramp():
    x = _ramp()
    y = resized_crop_flip(x, *_params(2, w=0.5, cx=0.5))
    # output column j is at u_j = (2j + 1)/W − 1 in [-1, 1]; it reads u = 0.5·u_j + 0.5, i.e. pixel ((u + 1)·W − 1)/2
    u = 0.5 * ((2 * torch.arange(W, dtype=torch.float64) + 1) / W - 1) + 0.5
    p = ((u + 1) * W - 1) / 2
    inside = p <= W - 1  # past the last pixel centre, reflection padding takes over
    for k in range(2):
        torch.testing.assert_close(y[k, 0, 3][inside], p[inside] + 10 * k, rtol=0, atol=1e-9)
    assert torch.allclose(y[:, :, 0], y[:, :, 5])  # a ramp along x is unchanged along y


def test_random_draws_are_per_sample_reproducible_and_within_bounds():
    x = _ramp(400)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pure_flip = random_resized_crop_flip(x, g(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flipped = [torch.allclose(pure_flip[k], x[k].flip(-1)) for k in range(400)]
    kept = [torch.allclose(pure_flip[k], x[k]) for k in range(400)]
    assert all(a != b for a, b in zip(flipped, kept)) and 150 < sum(flipped) < 250
    a, b = random_resized_crop_flip(x, g()), random_resized_crop_flip(x, g())
    assert torch.equal(a, b)
    # every crop reads inside the image: values stay within each image's own range [10k, 10k + 7]
    lo = 10.0 * torch.arange(400, dtype=torch.float64).view(-1, 1, 1, 1)
    assert (a >= lo - 1e-9).all() and (a <= lo + W - 1 + 1e-9).all()
    widths = (a[:, 0, 0, -1] - a[:, 0, 0, 0]).abs()  # the window's width in pixels, roughly
    assert widths.min() < 3.5 and widths.max() > 5.5  # crops of different sizes


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher"))


def test_distill_with_augmentation_runs(teacher, tmp_path):
    s = distill(tiny_config(teacher, tmp_path, augment=True, eval_every=6))
    assert s["finished"] and 0 <= s["student_acc"] <= 100
