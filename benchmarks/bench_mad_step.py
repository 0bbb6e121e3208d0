"""One MAD iteration (generator step + EMA step + student step) end to end: eager reference
(every madfast op on its torch reference), madfast fused (backend auto), and fused +
torch.compile. Cases: CIFAR ResNet-34 → ResNet-18 at 32 px, batch 256; torchvision ResNet-50 →
ResNet-18 at 224 px, batch 64. Goal on a GPU: ≥ 1.5× the eager iteration.

On CPU the batches are divided by MADFAST_BENCH_MAD_DIVISOR (default 32) so that a round takes
seconds, and the compiled provider runs only with MADFAST_BENCH_MAD_COMPILE=1 (inductor's CPU
compile of these nets takes minutes). ``samples_per_s`` counts every generated image.
"""

from __future__ import annotations

import os

import pytest
import torch

from madfast.data import Normalize
from madfast.models import Generator, build_model
from madfast.train.config import DistillConfig
from madfast.train.distributed import DistContext
from madfast.train.task import MADTask

CASES = {
    "r34_r18_32px_b256": dict(teacher="cifar_resnet34", student="cifar_resnet18", img_size=32, batch=256),
    "r50_r18_224px_b64": dict(teacher="resnet50", student="resnet18", img_size=224, batch=64),
}
PROVIDERS = {"eager": dict(backend="torch"), "fused": dict(backend="auto"),
             "fused_compile": dict(backend="auto", compile=True, compile_mode="max-autotune-no-cudagraphs")}


def make_task(case: dict, provider: dict, device: torch.device) -> MADTask:
    divisor = 1 if device.type == "cuda" else int(os.environ.get("MADFAST_BENCH_MAD_DIVISOR", 32))
    batch = max(2, case["batch"] // divisor)
    cfg = DistillConfig(dataset="cifar10", teacher=case["teacher"], student=case["student"], batch_size=batch,
                        g_pretrain_steps=0, s_steps=1, g_steps=1, steps=10**6, device=device.type,
                        amp="bf16" if device.type == "cuda" else "none", channels_last=device.type == "cuda",
                        **provider)
    torch.manual_seed(0)
    teacher, student = build_model(cfg.teacher, 10), build_model(cfg.student, 10)
    generator = Generator(cfg.nz, 10, case["img_size"], 3, cfg.ngf, backend=cfg.backend)
    normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return MADTask(cfg, teacher, student, generator, normalize, DistContext(0, 1, device))


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", list(CASES))
def test_mad_iteration(benchmark, device, case, provider):
    from conftest import timed

    if provider == "fused_compile" and device.type != "cuda" and os.environ.get("MADFAST_BENCH_MAD_COMPILE") != "1":
        pytest.skip("compiled CPU provider: set MADFAST_BENCH_MAD_COMPILE=1")
    benchmark.group = f"mad_iteration/{case}"
    task = make_task(CASES[case], PROVIDERS[provider], device)
    timed(benchmark, lambda: task.iteration(0), device, bytes_moved=0, provider=provider, baseline="eager")
    images = task.batch * (task.cfg.g_steps + task.cfg.s_steps * 2)
    benchmark.extra_info["batch"] = task.batch
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["samples_per_s"] = images / benchmark.stats.stats.mean
