"""One MAD iteration (generator step + EMA step + student step) end to end, for the providers of
`madfast bench step` (madfast/train/step_bench.py): the eager reference, madfast's default and the
default compiled. Cases: CIFAR ResNet-34 → ResNet-18 at 32 px, batch 256; torchvision ResNet-50 →
ResNet-18 at 224 px, batch 64. `madfast bench step` reports the same iteration by phase, op kind
and network.

On CPU the batches are divided by MADFAST_BENCH_MAD_DIVISOR (default the case's cpu_divisor or 32) so that a round takes
about a second, and the compiled provider runs only with MADFAST_BENCH_MAD_COMPILE=1 (inductor's
CPU compile of these nets takes minutes). ``samples_per_s`` counts every generated image.
"""

from __future__ import annotations

import os

import pytest

from madfast.train.step_bench import CASES, PROVIDERS, make_task


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", list(CASES))
def test_mad_iteration(benchmark, device, case, provider):
    from conftest import timed

    if provider == "default_compile" and device.type != "cuda" and os.environ.get("MADFAST_BENCH_MAD_COMPILE") != "1":
        pytest.skip("compiled CPU provider: set MADFAST_BENCH_MAD_COMPILE=1")
    benchmark.group = f"mad_iteration/{case}"
    divisor = 1 if device.type == "cuda" else int(os.environ.get("MADFAST_BENCH_MAD_DIVISOR",
                                                                 CASES[case].get("cpu_divisor", 32)))
    task = make_task(CASES[case], PROVIDERS[provider](device), device, divisor)
    timed(benchmark, lambda: task.iteration(1), device, bytes_moved=0, provider=provider, baseline="eager")
    images = task.batch * (task.cfg.g_steps + task.cfg.s_steps * 2)
    benchmark.extra_info["batch"] = task.batch
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["samples_per_s"] = images / benchmark.stats.stats.mean
