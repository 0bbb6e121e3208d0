"""`madfast demo`: a teacher on the embedded digits, MAD into a half-width student, the numbers.

The settings follow the calibration of the issue (3-conv CNN teacher with BN, half-width
student, generator nz 64 / ngf 32 with 2 bilinear up-blocks, batch 64, λ_bn = λ_ce = 1, δ = 3,
α = 0.95, 3 student steps per generator step, Adam).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

from madfast.train.config import DistillConfig, TeacherConfig
from madfast.train.loop import distill, train_teacher

__all__ = ["run_demo", "demo_configs"]


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
               "steps": distill_cfg.g_pretrain_steps + distill_cfg.steps}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
