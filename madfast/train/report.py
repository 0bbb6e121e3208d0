"""PNG outputs of a run: a grid of G and G̃ samples, and losses/accuracy over steps."""

from __future__ import annotations

import copy

import torch

from madfast.train.logger import read_metrics
from madfast.train.task import MADTask

__all__ = ["save_sample_grid", "save_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def save_sample_grid(task: MADTask, path: str, per_class: int = 4, seed: int = 0) -> None:
    """Rows: classes; left half G, right half G̃ (when kept). Copies are sampled so that the run's
    generators (and their BN statistics) are untouched."""
    plt = _pyplot()
    gens = [("G", task.g_raw)] + ([("EMA-G", task.ema.module)] if task.ema is not None else [])
    k = task.g_raw.num_classes
    y = torch.arange(k, device=task.device).repeat_interleave(per_class)
    z = torch.randn(len(y), task.cfg.nz, generator=torch.Generator().manual_seed(seed)).to(task.device)
    fig, axes = plt.subplots(1, len(gens), figsize=(3.2 * len(gens), 0.8 * k + 0.6), squeeze=False)
    for ax, (name, g) in zip(axes[0], gens):
        x = copy.deepcopy(g)(z, y).float().cpu()
        x = (x + 1) / 2 if task.cfg.gen_output == "tanh" else x
        c, h, w = x.shape[1:]
        grid = x.view(k, per_class, c, h, w).permute(0, 3, 1, 4, 2).reshape(k * h, per_class * w, c)
        ax.imshow(grid.squeeze(-1).clamp(0, 1).numpy(), cmap="gray" if c == 1 else None)
        ax.set_title(f"{name} (rows: classes 0–{k - 1})")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_curves(metrics_csv: str, path: str) -> None:
    """Generator and student losses (left) and student test accuracy (right) against step."""
    plt = _pyplot()
    rows = read_metrics(metrics_csv)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
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
    plt.close(fig)
