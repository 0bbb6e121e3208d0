"""`madfast demo`: a teacher on the embedded digits, MAD into a half-width student, the numbers.

The settings (``demo_configs``) are calibrated to pass in minutes on two CPU cores.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace

from madfast.train.config import DistillConfig, TeacherConfig
from madfast.train.loop import distill, train_teacher

__all__ = ["run_demo", "demo_configs", "PASS_RATIO", "run_ablation", "ABLATIONS", "SHIFTS", "format_ablation"]


# The demo passes when the student reaches this fraction of the teacher's test accuracy: well below
# what every seed and CPU we tried reached (docs/demo.md), well above a student that did not learn.
PASS_RATIO = 0.90


def demo_configs(out: str, seed: int = 0) -> tuple[TeacherConfig, DistillConfig]:
    teacher = TeacherConfig(dataset="digits", model="small_cnn", epochs=8, batch_size=64, optimizer="adam",
                            lr=3e-3, weight_decay=0.0, seed=seed, out=os.path.join(out, "teacher"))
    student = DistillConfig(dataset="digits", teacher="small_cnn", student="small_cnn_half",
                            teacher_ckpt=os.path.join(out, "teacher", "teacher.pt"), nz=64, ngf=32,
                            batch_size=64, steps=700, g_pretrain_steps=100, s_steps=3, lr_s=2e-3, lr_g=1e-3,
                            seed=seed, out=out, log_every=20, eval_every=100, ckpt_every=500, keep_ckpts=1,
                            num_workers=0)
    return teacher, student


def run_demo(out: str, seed: int = 0, progress: bool = True, teacher_overrides: dict | None = None,
             distill_overrides: dict | None = None) -> dict:
    """Trains the teacher, distills the student, writes OUT/metrics.json and returns it."""
    t0 = time.perf_counter()
    teacher_cfg, distill_cfg = demo_configs(out, seed)
    teacher_cfg = replace(teacher_cfg, progress=progress, **(teacher_overrides or {}))
    distill_cfg = replace(distill_cfg, progress=progress, **(distill_overrides or {}))
    teacher = train_teacher(teacher_cfg)
    run = distill(distill_cfg)
    metrics = {"teacher_acc": teacher["test_acc"], "student_acc": run["student_acc"],
               "ratio": run["student_acc"] / teacher["test_acc"], "seconds": time.perf_counter() - t0,
               "teacher_seconds": teacher["seconds"], "distill_seconds": run["seconds"], "seed": seed,
               "steps": distill_cfg.g_pretrain_steps + distill_cfg.steps,
               "distill_seconds_to_teacher_fraction": run["seconds_to_teacher_fraction"]}
    metrics["passed"] = metrics["ratio"] >= PASS_RATIO
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


# The ablation's variants: MAD; the no-EMA baseline (plain adversarial distillation, ABM/DFAD-like);
# MAD without the adversarial term (δ → 0: −min(D, δ) is flat, so its gradient is exactly zero and G
# keeps training on the CE and BN terms alone).
ABLATIONS = {"MAD": {}, "no-EMA": {"ema": False}, "no-adversarial": {"adv_bound": 1e-12}}

# How far G's distribution moves between student updates. "demo": the demo's own settings (3 student
# steps per G step, lr_G 1e-3). "hard": one student step per G step and a 10× faster G — the student
# trails a moving generator, the regime MAD's EMA generator is meant for.
SHIFTS = {"demo": {}, "hard": {"s_steps": 1, "lr_g": 1e-2}}


def run_ablation(out: str, seeds: list[int], steps: int | None = None, progress: bool = True,
                 shift: str = "demo") -> dict:
    """Per seed one teacher, then each of ABLATIONS distilled from it on that seed under ``shift``
    (a key of SHIFTS); writes OUT/ablation.json ({variant: {seed: metrics}} and the summary) and
    returns it."""
    if not seeds:
        raise ValueError("run_ablation: seeds must name at least one seed")
    if shift not in SHIFTS:
        raise ValueError(f"run_ablation: shift must be one of {sorted(SHIFTS)}, got {shift!r}")
    runs: dict[str, dict[int, dict]] = {name: {} for name in ABLATIONS}
    for seed in seeds:
        base = os.path.join(out, f"seed-{seed}")
        teacher_cfg, distill_cfg = demo_configs(base, seed)
        teacher = train_teacher(replace(teacher_cfg, progress=progress))
        for name, overrides in ABLATIONS.items():
            cfg = replace(distill_cfg, progress=progress, out=os.path.join(base, name),
                          **({"steps": steps} if steps else {}), **SHIFTS[shift], **overrides)
            run = distill(cfg)
            runs[name][seed] = {"student_acc": run["student_acc"], "teacher_acc": teacher["test_acc"],
                                "ratio": run["student_acc"] / teacher["test_acc"], "seconds": run["seconds"]}
    summary = {name: _spread([r["student_acc"] for r in by_seed.values()]) for name, by_seed in runs.items()}
    result = {"seeds": list(seeds), "steps": steps or distill_cfg.steps, "shift": shift,
              "shift_settings": SHIFTS[shift], "runs": runs, "summary": summary}
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def format_ablation(result: dict) -> str:
    """The table `madfast demo --ablation` prints: student test accuracy per variant over the seeds."""
    seeds = result["seeds"]
    shift = result.get("shift", "demo")
    settings = ", ".join(f"{k} {v}" for k, v in result.get("shift_settings", {}).items())
    lines = [f"student test accuracy (%) over seeds {', '.join(map(str, seeds))}, {result['steps']} adversarial steps, "
             f"shift {shift}{f' ({settings})' if settings else ''}",
             f"{'variant':<16}{'mean ± std':>16}{'min–max':>16}  per seed"]
    for name, s in result["summary"].items():
        per_seed = " ".join(f"{result['runs'][name][seed]['student_acc']:.1f}" for seed in seeds)
        lines.append(f"{name:<16}{s['mean']:>9.2f} ± {s['std']:<4.2f}{s['min']:>9.1f}–{s['max']:<6.1f}  {per_seed}")
    return "\n".join(lines)
