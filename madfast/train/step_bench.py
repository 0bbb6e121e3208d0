"""`madfast bench step`: what one MAD iteration costs, whole and by part.

For each provider (the eager reference, madfast's default, the default compiled) on one case, on
one device in one process:
- the iteration's median wall time (the device synchronised at the end of each), and samples/s;
- the same split by phase (G step, EMA step, student steps), synchronised between phases;
- from torch.profiler, self time by op kind (convolution, batch norm, madfast ops, optimiser, the
  rest) and by network and direction (each backward op is charged to the network whose forward
  recorded its autograd sequence number);
- the aten ops dispatched and the host syncs made per iteration (counted in a separate run).

Ratios are taken against the eager provider measured in the same run.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from madfast.check.environment import environment
from madfast.check.timing import synchronize, warm_up

__all__ = ["CASES", "PROVIDERS", "OpCounter", "make_task", "bench_step", "write_step_report"]

# The benchmark's cases: the CIFAR preset's pair at 32 px, an ImageNet pair at 224 px, the demo's. On
# CPU the batch is divided (``divisor``, default ``cpu_divisor`` or 32) so that an iteration takes
# about a second.
CASES = {
    "r34_r18_32px_b256": dict(teacher="cifar_resnet34", student="cifar_resnet18", img_size=32, batch=256),
    "r50_r18_224px_b64": dict(teacher="resnet50", student="resnet18", img_size=224, batch=64),
    # the demo's networks and batch (3 channels here), undivided on CPU
    "demo_cnn_16px_b64": dict(teacher="small_cnn", student="small_cnn_half", img_size=16, batch=64, cpu_divisor=1),
}


def _eager(device: torch.device) -> dict:
    """What a plain PyTorch MAD loop runs: the torch reference of every op, fp32, the default layout,
    and torch's default optimiser kernels (foreach on CUDA, one tensor at a time on CPU)."""
    return dict(backend="torch", amp="none", channels_last=False, cudnn_benchmark=False,
                optimizer_impl="foreach" if device.type == "cuda" else "loop")


PROVIDERS = {
    "eager": _eager,
    "default": lambda device: {},  # DistillConfig's defaults, resolved for the device
    "default_compile": lambda device: dict(compile=True),
    # the forwards and backwards replayed as CUDA graphs (on a CPU: default_compile)
    "default_cudagraphs": lambda device: dict(compile=True, compile_mode="reduce-overhead"),
    # variants, to measure a default before adopting it
    "default_bf16": lambda device: dict(amp="bf16"),
    "default_contiguous": lambda device: dict(channels_last=False),
    "default_foreach": lambda device: dict(optimizer_impl="foreach"),
    "eager_fused_optim": lambda device: {**_eager(device), "optimizer_impl": "fused"},
    # the defaults with every op on its torch reference: what the fused kernels add to the iteration
    "default_torch_ops": lambda device: dict(backend="torch"),
}

_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "allclose", "unique", "_unique2"}
_SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class OpCounter(TorchDispatchMode):
    """While active: the aten ops dispatched, and every host sync — an op that reads a device value
    on the host, or a Tensor method that does (``.item()``, ``.tolist()``, ``bool(t)``, ...) — as
    (label, what), ``label`` being whatever the caller last set (None: not recorded)."""

    def __init__(self):
        super().__init__()
        self.label, self.ops, self.syncs = None, 0, []
        self._saved: dict[str, object] = {}

    def _record(self, what: str) -> None:
        if self.label is not None:
            self.syncs.append((self.label, what))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += self.label is not None
        if func._opname in _SYNC_OPS:
            self._record(f"aten::{func._opname}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in _SYNC_METHODS:
            method = self._saved[name] = getattr(torch.Tensor, name)

            def counted(t, *args, _method=method, _name=name, **kwargs):
                self._record(f"Tensor.{_name}")
                return _method(t, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        self._saved.clear()
        return super().__exit__(*exc)


def make_task(case: dict, provider: dict, device: torch.device, divisor: int = 1):
    """A MADTask for ``case`` with the ``provider``'s config overrides, randomly initialised."""
    from madfast.data import Normalize
    from madfast.models import Generator, build_model
    from madfast.train.config import DistillConfig
    from madfast.train.distributed import DistContext
    from madfast.train.task import MADTask

    cfg = DistillConfig(dataset="cifar10", teacher=case["teacher"], student=case["student"],
                        batch_size=max(2, case["batch"] // divisor), g_pretrain_steps=0, s_steps=1, g_steps=1,
                        steps=10**6, device=device.type, **provider)
    torch.manual_seed(0)
    teacher, student = build_model(cfg.teacher, 10), build_model(cfg.student, 10)
    generator = Generator(cfg.nz, 10, case["img_size"], 3, cfg.ngf, backend=cfg.backend)
    return MADTask(cfg, teacher, student, generator, Normalize((0.5,) * 3, (0.25,) * 3), DistContext(0, 1, device))


def _iteration_times(task, device: torch.device, rounds: int) -> list[float]:
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        task.iteration(1 + i)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def _phase_timer(task, device: torch.device, totals: dict):
    """Times the task's three steps, synchronised around each, into ``totals`` (seconds summed)."""
    names = ("generator_step", "ema_step", "student_step")
    for name in names:
        method = getattr(task, name)

        def timed(*args, _method=method, _name=name, **kwargs):
            synchronize(device)
            t0 = time.perf_counter()
            out = _method(*args, **kwargs)
            synchronize(device)
            totals[_name] += time.perf_counter() - t0
            return out
        setattr(task, name, timed)
    try:
        yield
    finally:
        for name in names:
            delattr(task, name)  # back to the class's method


def _op_kind(name: str) -> str:
    if name.startswith("madfast::"):
        return "madfast ops"
    if "conv" in name or "mkldnn_convolution" in name:
        return "convolution"
    if "batch_norm" in name:
        return "batch norm"
    if name.startswith("Optimizer.") or "_foreach_" in name or "_fused_" in name:
        return "optimiser"
    return "other"


def _profile(task, device: torch.device, iterations: int) -> dict:
    """Self time (ms per iteration) by op kind, and by network × forward/backward."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    networks = {"teacher": task.teacher, "student": task.student_raw, "generator": task.g_raw}
    if task.ema is not None:
        networks["ema_generator"] = task.ema.module
    ranges: dict[int, record_function] = {}
    handles = []
    for name, net in networks.items():
        def enter(module, args, _name=name):
            ranges[id(module)] = r = record_function(f"forward/{_name}")
            r.__enter__()

        def leave(module, args, out):
            ranges.pop(id(module)).__exit__(None, None, None)
        handles += [net.register_forward_pre_hook(enter), net.register_forward_hook(leave)]
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        task.iteration(1)  # the hooks make torch.compile recompile: not inside the profile
        synchronize(device)
        with profile(activities=activities) as prof:
            for i in range(iterations):
                task.iteration(1 + i)
            synchronize(device)
    finally:
        for h in handles:
            h.remove()
    events = prof.events()
    # every op under a forward/<net> range owns its autograd sequence number
    owner: dict[int, str] = {}
    net_of: dict[int, str] = {}
    for e in events:
        nets = [p.name.removeprefix("forward/") for p in _ancestors(e) if p.name.startswith("forward/")]
        if nets:
            net = nets[-1]  # the outermost network
            net_of[id(e)] = net
            if e.sequence_nr >= 0:
                owner.setdefault(e.sequence_nr, net)
    by_kind, by_net = collections.Counter(), collections.Counter()
    for e in events:
        if e.name.startswith(("forward/", "ProfilerStep")):
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if not us:
            continue
        kind_from = next((p.name for p in _ancestors(e) if p.name.startswith("Optimizer.")), e.name)
        by_kind[_op_kind(kind_from)] += us
        backward = next((p for p in _ancestors(e) if p.name.startswith("autograd::engine::evaluate_function")), None)
        if backward is not None:
            by_net[f"{owner.get(backward.sequence_nr, 'other')} backward"] += us
        else:
            by_net[f"{net_of[id(e)]} forward" if id(e) in net_of else "outside the networks"] += us
    scale = 1e-3 / iterations  # µs over all iterations → ms per iteration
    return {"ms_by_op_kind": {k: v * scale for k, v in by_kind.most_common()},
            "ms_by_network": {k: v * scale for k, v in by_net.most_common()},
            "profiled": "device (CUDA) self time" if cuda else "CPU self time"}


def _ancestors(e):
    while e is not None:
        yield e
        e = e.cpu_parent


def _count(task, step: int) -> dict:
    """Aten ops and host syncs of one iteration; the FLOPs (matmuls and convolutions, forward and
    backward, as torch.utils.flop_counter counts them) of one G step and one student step."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = OpCounter()
    with counter:
        counter.label = step
        task.iteration(step)
        counter.label = None
    gflop = {}
    for phase in ("generator_step", "student_step"):
        with FlopCounterMode(display=False) as flops:
            getattr(task, phase)()
        gflop[phase] = flops.get_total_flops() / 1e9
    return {"aten_ops": counter.ops, "host_syncs": len(counter.syncs),
            "host_sync_kinds": sorted(set(what for _, what in counter.syncs)), "gflop_by_phase": gflop}


def bench_step(case: str = "r34_r18_32px_b256", providers: tuple[str, ...] = ("eager", "default"),
               device: str | torch.device = "auto", rounds: int = 10, divisor: int | None = None,
               profile_iterations: int = 2, progress: bool = True) -> dict:
    """Measures ``providers`` on ``case``; returns the results (see the module's docstring)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else device)
    if case not in CASES:
        raise ValueError(f"bench_step: case must be one of {sorted(CASES)}, got {case!r}")
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"bench_step: providers must be among {sorted(PROVIDERS)}, got {unknown}")
    spec = CASES[case]
    divisor = divisor if divisor is not None else (1 if device.type == "cuda" else spec.get("cpu_divisor", 32))
    tasks = {}
    for name in providers:
        if progress:
            print(f"bench step {case}: building and warming up {name} ...", flush=True)
        tasks[name] = make_task(spec, PROVIDERS[name](device), device, divisor)
        warm_up(lambda: tasks[name].iteration(1), device, runs=3)  # compilation, autotuning, allocator
    # Rounds interleave the providers, so that a machine's drift (clock, other load) hits all alike.
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(rounds):
        for name, task in tasks.items():
            times[name] += _iteration_times(task, device, 1)
    results: dict[str, dict] = {}
    for name, task in list(tasks.items()):
        if progress:
            print(f"bench step {case}: phases, profile and counts of {name} ...", flush=True)
        phases: dict[str, float] = collections.Counter()
        phase_rounds = max(2, rounds // 2)
        with _phase_timer(task, device, phases):
            _iteration_times(task, device, phase_rounds)
        median = statistics.median(times[name])
        images = task.batch * (task.cfg.g_steps + task.cfg.s_steps * (2 if task.cfg.ema else 1))
        results[name] = {
            "overrides": PROVIDERS[name](device),
            "resolved": {k: getattr(task.cfg, k) for k in ("backend", "amp", "channels_last", "cudnn_benchmark",
                                                           "optimizer_impl", "compile", "compile_mode")},
            "median_s": median, "min_s": min(times[name]), "max_s": max(times[name]), "rounds": rounds,
            "samples_per_s": images / median,
            "phase_ms": {k: v * 1e3 / phase_rounds for k, v in phases.items()},
            **_profile(task, device, profile_iterations),
            # counting modes make torch.compile fall back to eager: counted on the eager code only
            **(_count(task, 1) if not task.cfg.compile else {"aten_ops": None, "host_syncs": None}),
        }
        del tasks[name]  # frees its memory before the next provider's profile
    if "eager" in results:
        for r in results.values():
            r["speedup_vs_eager"] = results["eager"]["median_s"] / r["median_s"]
    return {"case": case, **spec, "batch": max(2, spec["batch"] // divisor), "divisor": divisor,
            "device": str(device), "machine": environment(device), "date": time.strftime("%Y-%m-%d"),
            "providers": results}


def write_step_report(result: dict, stem: str) -> list[str]:
    """``stem``.json, .md (a table per provider and part) and .png (stacked phase bars); returns the paths."""
    from madfast._extras import require

    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    provs = result["providers"]
    m = result["machine"]
    lines = [f"One MAD iteration, {result['case']} at batch {result['batch']} on {result['device']} "
             f"({m.get('gpu') or m['cpu']}, {m['cpu_threads']} threads, torch {m['torch']}), {result['date']}", "",
             "| provider | median ms | × eager | samples/s | G step ms | EMA ms | S step ms | aten ops | host syncs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in provs.items():
        ph = r["phase_ms"]
        lines.append(f"| {name} | {r['median_s'] * 1e3:.1f} | {r.get('speedup_vs_eager', float('nan')):.2f} | "
                     f"{r['samples_per_s']:.0f} | {ph.get('generator_step', 0):.1f} | {ph.get('ema_step', 0):.2f} | "
                     f"{ph.get('student_step', 0):.1f} | {r['aten_ops'] if r['aten_ops'] is not None else '–'} | "
                     f"{r['host_syncs'] if r['host_syncs'] is not None else '–'} |")
    for part in ("ms_by_op_kind", "ms_by_network"):
        keys = list(dict.fromkeys(k for r in provs.values() for k in r[part]))
        lines += ["", f"| {part.removeprefix('ms_by_').replace('_', ' ')} (profiled ms) | " + " | ".join(provs) + " |",
                  "|---|" + "---:|" * len(provs)]
        lines += [f"| {k} | " + " | ".join(f"{r[part].get(k, 0):.1f}" for r in provs.values()) + " |" for k in keys]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    fig = require("matplotlib.figure", "the benchmark chart").Figure(figsize=(6, 4))
    ax = fig.subplots()
    bottom = [0.0] * len(provs)
    for phase in ("generator_step", "ema_step", "student_step"):
        ms = [r["phase_ms"].get(phase, 0.0) for r in provs.values()]
        ax.bar(list(provs), ms, bottom=bottom, label=phase.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, ms)]
    for i, r in enumerate(provs.values()):
        ax.text(i, bottom[i], f"{r.get('speedup_vs_eager', float('nan')):.2f}×", ha="center", va="bottom")
    ax.set_ylabel("ms per iteration (phases synchronised)")
    ax.set_title(f"{result['case']}, batch {result['batch']}, {result['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=100)
    return [stem + ext for ext in (".json", ".md", ".png")]
