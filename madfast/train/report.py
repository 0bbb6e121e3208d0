"""PNG outputs of a run: a grid of G and G̃ samples, and losses/accuracy over steps (never needed by the run:
the loop turns their failures into warnings)."""

from __future__ import annotations

import copy

import torch

from madfast._extras import require
from madfast.train.logger import read_metrics
from madfast.train.task import MADTask

__all__ = ["save_sample_grid", "save_curves", "grid_classes"]


def grid_classes(num_classes: int, max_classes: int = 16) -> torch.Tensor:
    """At most ``max_classes`` class indices spread evenly over 0 … num_classes − 1 (both ends included)."""
    n = min(num_classes, max_classes)
    return torch.linspace(0, num_classes - 1, n, dtype=torch.float64).round().long()


@torch.no_grad()
def save_sample_grid(task: MADTask, path: str, per_class: int = 4, seed: int = 0, max_classes: int = 16,
                     chunk: int = 64) -> None:
    """One row per class (at most ``max_classes``, chosen evenly), ``per_class`` samples of G, then
    as many of G̃ (when kept). Copies are sampled ``chunk`` images per forward, so that the run's
    generators (and their BN statistics) are untouched and 1000 classes at 224 px fit in memory."""
    utils = require("torchvision.utils", "samples.png")
    gens = [task.g_raw] + ([task.ema.module] if task.ema is not None else [])
    y = grid_classes(task.g_raw.num_classes, max_classes).repeat_interleave(per_class)
    z = torch.randn(len(y), task.cfg.nz, generator=torch.Generator().manual_seed(seed))
    halves = []
    for g in gens:
        g = copy.deepcopy(g)
        x = torch.cat([g(zc.to(task.device), yc.to(task.device)).float().cpu()
                       for zc, yc in zip(z.split(chunk), y.split(chunk))])
        halves.append((x + 1) / 2 if task.cfg.gen_output == "tanh" else x)
    # rows of G's samples, then G̃'s, side by side: (classes, 2·per_class) images
    rows = torch.stack([h.view(-1, per_class, *h.shape[1:]) for h in halves], dim=1).flatten(0, 2)
    utils.save_image(utils.make_grid(rows.clamp(0, 1), nrow=per_class * len(gens), padding=1), path)


def save_curves(metrics_csv: str, path: str) -> None:
    """Generator and student losses (left) and student test accuracy (right) against step."""
    fig = require("matplotlib.figure", "curves.png").Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    rows = read_metrics(metrics_csv)
    for name in ("g_loss", "g_bn", "g_ce", "s_kl_g", "s_kl_ema"):
        pts = [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]
        if pts:
            left.plot(*zip(*pts), label=name)
    left.set_yscale("symlog", linthresh=0.1)
    left.set_xlabel("step")
    left.legend()
    acc = [(int(r["step"]), float(r["student_acc"])) for r in rows if r.get("student_acc")]
    if acc:
        right.plot(*zip(*acc), marker="o")
    right.set_xlabel("step")
    right.set_ylabel("student test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
