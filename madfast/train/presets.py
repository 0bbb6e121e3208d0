"""Per-data-set starting points for `madfast distill --preset NAME`.

Each value carries its source, as in madfast.train.config: paper, reported, practice or ours (see
shared/mad/ALGORITHM.md). Resolution order: defaults ← preset ← --config file ← flags.
"""

from __future__ import annotations

from madfast.errors import UsageError

__all__ = ["PRESETS", "preset_values", "preset_sources"]

P, R, PR, O = "paper", "reported", "practice", "ours"

_COMMON = {
    "conditioning": ("sum", P),  # "sum trains most stably and gives the best accuracy"
    "ema_decay": (0.95, R),  # best of the paper's ablation (0.2 and 0.999 worse)
    "lambda0": (1.0, O), "lambda1": (1.0, O),
    "g_steps": (1, PR), "s_steps": (10, PR),  # ABM/ZSKT: 1 generator step, 10 student steps
    "lr_g": (1e-3, PR), "grad_clip": (5.0, PR),
    "nz": (256, O), "ngf": (64, O), "gen_block": ("conv", O), "adv_bound": (3.0, O),
    "augment": (True, PR),  # random resized crop + flip of synthetic samples (Fast-Datafree, CMI)
}

_CIFAR = {
    **_COMMON,
    "teacher": ("cifar_resnet34", R), "student": ("cifar_resnet18", R), "img_size": (32, P),
    "batch_size": (256, O), "steps": (20000, O), "g_pretrain_steps": (200, O),
    "optimizer_s": ("sgd", PR), "lr_s": (0.1, PR), "weight_decay_s": (5e-4, PR),  # Fast-DFKD students
    "lambda_ce": (1.0, O), "lambda_bn": (None, O),  # auto: 1.0 with a BatchNorm teacher, else 0
}

_IMAGENET_SCALE = {
    **_COMMON,
    "teacher": ("resnet50", R), "student": ("resnet18", R),  # the ImageNet row compares R50 → R18
    "img_size": (224, P), "batch_size": (256, O), "steps": (40000, O), "g_pretrain_steps": (500, O),
    "optimizer_s": ("sgd", PR), "lr_s": (0.1, PR), "weight_decay_s": (1e-4, PR),
    "lambda_ce": (1.0, O), "lambda_bn": (0.05, PR),  # DeepInversion's ImageNet BN weight
    "eval_batch_size": (256, O), "num_workers": (8, O),
}

PRESETS: dict[str, dict[str, tuple[object, str]]] = {
    "cifar10": {"dataset": ("cifar10", P), **_CIFAR},
    "cifar100": {"dataset": ("cifar100", P), **_CIFAR},
    "tinyimagenet": {"dataset": ("tinyimagenet", P), **_CIFAR, "teacher": ("resnet34", O), "student": ("resnet18", O),
                     "img_size": (64, P), "steps": (30000, O), "g_pretrain_steps": (300, O)},
    "imagenet": {"dataset": ("imagenet", P), **_IMAGENET_SCALE},
    "places365": {"dataset": ("places365", P), **_IMAGENET_SCALE},
}


def _get(name: str) -> dict[str, tuple[object, str]]:
    if name not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def preset_values(name: str, fields: set[str] | None = None) -> dict:
    """field → value of preset ``name`` (only those in ``fields`` when given: a field the config
    lacks is left out, so a preset may name settings of a newer config)."""
    return {k: v for k, (v, _) in _get(name).items() if fields is None or k in fields}


def preset_sources(name: str) -> dict[str, str]:
    """field → "paper" | "reported" | "practice" | "ours"."""
    return {k: src for k, (_, src) in _get(name).items()}
