"""Shared benchmark harness: device choice, the timing rule of madfast.check.timing (warm-up, then
runs that end when the device has finished) under pytest-benchmark's timer, versions in the JSON,
and ratios against the eager baseline measured in the same run."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # lets `--bench-triton-cpu` time the Triton interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.addoption("--bench-triton-cpu", action="store_true",
                     help="also time Triton kernels in the CPU interpreter (slow, not representative)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--bench-device"))


def madfast_backend(provider: str, op: str, device: torch.device, request) -> str:
    """The backend a "madfast_<backend>" provider names ("torch" for the others). Skips the benchmark
    when that backend cannot run ``op`` on ``device``, or would be the Triton CPU interpreter (unless
    --bench-triton-cpu)."""
    from madfast import _backend  # after TRITON_INTERPRET is set above

    if not provider.startswith("madfast_"):
        return "torch"
    backend = provider.removeprefix("madfast_")
    try:
        _backend.choose(op=op, backend=backend, device=device, dtype=None)
    except _backend.BackendUnavailableError as e:
        pytest.skip(str(e))
    if backend == "triton" and device.type == "cpu" and not request.config.getoption("--bench-triton-cpu"):
        pytest.skip("Triton on CPU is the interpreter; pass --bench-triton-cpu to time it anyway")
    return backend


def timed(benchmark, fn, device: torch.device, *, bytes_moved: int, provider: str, baseline: str):
    """Times fn() (synchronised), and records GB/s and what the ratios are taken against."""
    from madfast.check.timing import synchronized, warm_up  # after TRITON_INTERPRET is set above

    warm_up(fn, device)
    benchmark.extra_info.update(provider=provider, baseline=baseline, bytes=bytes_moved)
    benchmark.pedantic(synchronized(fn, device), rounds=int(os.environ.get("MADFAST_BENCH_ROUNDS", 20)))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = bytes_moved / benchmark.stats.stats.mean / 1e9


def pytest_benchmark_update_machine_info(config, machine_info):
    from madfast.check.environment import environment

    for key, value in environment(torch.device(config.getoption("--bench-device"))).items():
        machine_info.setdefault(key, value)  # pytest-benchmark's own "cpu" (cpuinfo) stays


def _ratios(benchmarks) -> None:
    """speedup = baseline mean / mean, and fraction of the same-run copy bandwidth, per group."""
    by_group: dict[str, dict[str, object]] = {}
    for b in benchmarks:
        by_group.setdefault(b["group"], {})[b["extra_info"]["provider"]] = b
    for rows in by_group.values():
        for b in rows.values():
            info = b["extra_info"]
            base = rows.get(info["baseline"])
            if base is not None:
                info["speedup_vs_baseline"] = base["stats"]["mean"] / b["stats"]["mean"]
            copy = rows.get("copy")
            if copy is not None:
                info["fraction_of_copy_bw"] = info["gbps"] / copy["extra_info"]["gbps"]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    _ratios(output_json["benchmarks"])


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    rows = [b.as_dict(include_data=False) for b in session.benchmarks]
    _ratios(rows)
    lines = ["", "| group | provider | mean µs | GB/s | × baseline | of copy BW |", "|---|---|---:|---:|---:|---:|"]
    for b in sorted(rows, key=lambda r: (r["group"], r["stats"]["mean"])):
        info = b["extra_info"]
        lines.append(f"| {b['group']} | {info['provider']} | {b['stats']['mean'] * 1e6:.0f} | {info['gbps']:.1f} | "
                     f"{info.get('speedup_vs_baseline', float('nan')):.2f} ({info['baseline']}) | "
                     f"{info.get('fraction_of_copy_bw', float('nan')):.0%} |")
    terminalreporter.write_line("\n".join(lines))
