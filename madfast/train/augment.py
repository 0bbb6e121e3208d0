"""Random resized crop + horizontal flip of a batch, per sample, as one differentiable resampling
(``affine_grid`` + ``grid_sample``): what Fast-Datafree/CMI apply to synthetic samples before the
student learns from them. Random draws come from the caller's generator (the task's checkpointed,
per-rank noise stream)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["resized_crop_flip", "random_resized_crop_flip"]


def resized_crop_flip(x: torch.Tensor, w: torch.Tensor, h: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
                      flip: torch.Tensor) -> torch.Tensor:
    """Sample i: the window of width w[i], height h[i] (fractions of the image) centred at
    (cx[i], cy[i]) (in [-1, 1] coordinates), mirrored where flip[i], resized back to the full image."""
    sign = torch.where(flip, -1.0, 1.0).to(x.dtype)
    zero = torch.zeros_like(w, dtype=x.dtype)
    theta = torch.stack([torch.stack([w.to(x.dtype) * sign, zero, cx.to(x.dtype)], 1),
                         torch.stack([zero, h.to(x.dtype), cy.to(x.dtype)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_resized_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None,
                             scale: tuple[float, float] = (0.25, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop(scale, ratio) + RandomHorizontalFlip, drawn per sample."""
    n, dev = x.shape[0], x.device
    u = torch.rand(5, n, device=dev, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2 * u[2] - 1) * (1 - w)  # the window stays inside the image
    cy = (2 * u[3] - 1) * (1 - h)
    return resized_crop_flip(x, w, h, cx, cy, u[4] < 0.5)
