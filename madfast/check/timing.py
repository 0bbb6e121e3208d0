"""Timing shared by `madfast check` and the pytest-benchmark suites (benchmarks/conftest.py): warm-up
runs first (compilation, autotuning, the allocator's caches), and every timed run ends only when the
device has finished its work, since CUDA kernels run asynchronously to the host.

median_seconds is the check's timer: on CUDA, CUDA events around each run with the L2 cache flushed
before it (so a working set that would fit in L2 is not timed warm). The benchmark suites time
``synchronized(fn, device)`` with pytest-benchmark's own wall-clock timer."""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable

import torch

__all__ = ["WARMUP_RUNS", "synchronize", "warm_up", "synchronized", "median_seconds"]

WARMUP_RUNS = 3
_FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 (H100: 50 MB)


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(fn: Callable[[], object], device: torch.device, runs: int = WARMUP_RUNS) -> None:
    """Runs ``fn()`` ``runs`` times untimed, then waits for the device."""
    for _ in range(runs):
        fn()
    synchronize(device)


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn()`` followed by a device synchronisation: what a wall-clock timer around it measures
    includes the device's work."""
    def run() -> None:
        fn()
        synchronize(device)
    return run


@functools.cache
def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)


def _cuda_seconds(fn: Callable[[], object], device: torch.device) -> float:
    _flush_buffer(device).zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def median_seconds(fn: Callable[[], object], device: torch.device, *, budget_s: float = 0.5,
                   min_runs: int = 3, max_runs: int = 100, warmup: int = WARMUP_RUNS) -> float:
    """Median time of ``fn()``: at least ``min_runs``, then as many as fit in ``budget_s``."""
    warm_up(fn, device, warmup)

    def once() -> float:
        if device.type == "cuda":
            return _cuda_seconds(fn, device)
        t0 = time.perf_counter()
        fn()  # the CPU's work is done when fn returns
        return time.perf_counter() - t0
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start_all < budget_s):
        times.append(once())
    return statistics.median(times)
