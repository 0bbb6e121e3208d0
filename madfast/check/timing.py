"""Timing for `madfast check`: medians of many runs; on CUDA, CUDA events around each run with the L2
cache flushed before it (so a working set that would fit in L2 is not timed warm)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["median_seconds"]

_FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 (H100: 50 MB)
_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _flush(device: torch.device) -> None:
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
    buf.zero_()


def median_seconds(fn: Callable[[], object], device: torch.device, *, budget_s: float = 0.5,
                   min_runs: int = 3, max_runs: int = 100, warmup: int = 2) -> float:
    """Median wall time of ``fn()``: at least ``min_runs``, then as many as fit in ``budget_s``."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times: list[float] = []
        start_all = time.perf_counter()
        while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start_all < budget_s):
            _flush(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start_all < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
