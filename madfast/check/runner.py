"""`madfast check`: every op on every backend that runs on the device, checked against an fp64 eager
PyTorch computation (values and every gradient, by the rule of madfast.check.tolerances), then timed
against eager PyTorch, torch.compile and madfast's own torch path. Rows are printed and written (JSON +
markdown) as each finishes, so a run cut short keeps all it measured; the verified-dispatch entries
(madfast._verified) are derived at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from madfast import _backend, _verified
from madfast.check.cases import CASES, Case, Shape
from madfast.check.environment import environment
from madfast.check.timing import median_seconds
from madfast.check.tolerances import FORWARD_FACTOR, GRADIENT_FACTOR, floor, rel_err, tolerance

__all__ = ["CheckOptions", "run_check", "environment", "verified_entries", "FORMAT"]

FORMAT = "madfast-check/1"


@dataclass
class CheckOptions:
    device: torch.device
    ops: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    out: Path
    quick: bool = False
    headline: bool = False  # only each op's headline shapes (Shape.headline)
    timing: bool = True  # False: correctness only
    compile: bool = True
    save: bool = False
    time_budget_s: float | None = None
    progress: bool = True
    batch_divisor: int = 1
    argv: list[str] = field(default_factory=list)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- running one case ---------------------------------------------------------------------------
def _map(fn, x):
    if isinstance(x, (list, tuple)):
        return type(x)(_map(fn, t) for t in x)
    return fn(x) if isinstance(x, torch.Tensor) else x


def _clone(x):
    return _map(lambda t: t.detach().clone(), x)


def _weights(outputs, device, seed=1234):
    """Fixed random cotangents for the outputs (fp64, on the CPU generator: the same for every run)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(device) for o in outputs]


def _differentiable(case: Case, inputs: list) -> list:
    xs = _clone(inputs)
    for i in case.grads:
        xs[i].requires_grad_(True)
    return xs


def _grad(case: Case, xs: list, outs, weights: list):
    """The gradients of Σᵢ⟨wᵢ, outᵢ⟩ with respect to xs[case.grads] (None where unused)."""
    pairs = [(o, w.to(o.dtype)) for o, w in zip(outs, weights) if o.requires_grad]
    return torch.autograd.grad([o for o, _ in pairs], [xs[i] for i in case.grads], [w for _, w in pairs],
                               allow_unused=True)


def _evaluate(case: Case, fn, inputs: list, weights: list | None):
    """Outputs, then the gradients of Σᵢ⟨wᵢ, outᵢ⟩ with respect to inputs[case.grads]."""
    xs = _differentiable(case, inputs)
    outs = fn(*xs)
    if weights is None:
        weights = _weights(outs, outs[0].device)
    grads = []
    if case.grads:
        got = _grad(case, xs, outs, weights)
        grads = [torch.zeros_like(xs[i]) if g is None else g for i, g in zip(case.grads, got)]
    return [o.detach() for o in outs] + grads, weights


def _compare(case: Case, actual, expected, same_dtype, dtype: torch.dtype, device: torch.device) -> dict:
    n_out = len(actual) - len(case.grads)
    worst = {"ratio": -1.0}
    for k, (a, e, s) in enumerate(zip(actual, expected, same_dtype)):
        factor = FORWARD_FACTOR if k < n_out else GRADIENT_FACTOR
        tol = tolerance(e, s, factor, floor(dtype, device, case.convolution))
        err = rel_err(a, e)
        ratio = err / tol if math.isfinite(err) else math.inf
        if not ratio <= worst["ratio"]:  # also takes NaN
            worst = {"ratio": ratio, "max_err": err, "tol": tol,
                     "worst": f"out{k}" if k < n_out else f"grad{case.grads[k - n_out]}"}
    worst["ok"] = bool(worst["ratio"] <= 1.0)
    return worst


def _inputs(case: Case, shape: Shape, dtype: torch.dtype, device: torch.device) -> list:
    # crc32, not hash(): str hashes are salted per process, and a rerun must see the same inputs
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.name}/{shape.label}".encode()))
    return case.make(shape, dtype, device, g)


def check_correctness(case: Case, backend: str, shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    inputs = _inputs(case, shape, dtype, device)
    expected, weights = _evaluate(case, case.eager, _map(lambda t: t.to(torch.float64), inputs), None)
    same_dtype, _ = _evaluate(case, case.eager, inputs, weights)
    actual, _ = _evaluate(case, case.fused(backend), inputs, weights)
    return _compare(case, actual, expected, same_dtype, dtype, device)


def _timed_callable(case: Case, fn, inputs: list, weights: list):
    if case.in_place:
        return lambda: fn(*inputs)
    xs = _differentiable(case, inputs)

    def fwd_bwd():
        outs = fn(*xs)
        if any(o.requires_grad for o in outs):
            _grad(case, xs, outs, weights)
    return fwd_bwd


def time_case(case: Case, fns: dict, shape: Shape, dtype: torch.dtype, device: torch.device,
              budget_s: float) -> dict[str, float]:
    """Seconds per forward+backward of each of ``fns`` (name → the case's callable) on one problem."""
    inputs = _inputs(case, shape, dtype, device)
    _, weights = _evaluate(case, case.eager, inputs, None)
    return {name: median_seconds(_timed_callable(case, fn, inputs, weights), device, budget_s=budget_s)
            for name, fn in fns.items()}


# ---- verified-dispatch entries ------------------------------------------------------------------
def verified_entries(rows: list[dict], env: dict) -> list[dict]:
    """One entry per (dispatcher op, fused backend, dtype) that was both checked and timed: ok when every
    correctness row of it passed; ratio the geometric mean over its timed shapes of torch time / its time."""
    if env.get("device") != "cuda":
        return []
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r["backend"] == "torch":
            continue
        for op in r.get("dispatch_ops", []):
            g = groups.setdefault((op, r["backend"], r["dtype"]), {"ok": True, "ratios": [], "check_ops": set()})
            g["check_ops"].add(r["op"])
            if r["kind"] == "correctness":
                g["ok"] = g["ok"] and r["ok"]
            elif r.get("x_torch") is not None:
                g["ratios"].append(r["x_torch"])
    entries = []
    for (op, backend, dtype), g in sorted(groups.items()):
        if not g["ratios"]:
            continue
        ratio = math.exp(sum(math.log(x) for x in g["ratios"]) / len(g["ratios"]))
        entries.append({"op": op, "backend": backend, "dtype": dtype, "gpu": env["gpu"],
                        "capability": env["capability"], "ratio": round(ratio, 4), "ok": g["ok"],
                        "date": env["date"][:10], "commit": env["commit"], "torch": env["torch"],
                        "triton": env["triton"], "check_ops": sorted(g["check_ops"])})
    return entries


# ---- output -------------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(x, spec) -> str:
    return "" if x is None else format(x, spec)


def _cells(r: dict, fail: str = "FAIL") -> list[str]:
    """op, backend, dtype, shape, then the kind's values, as both the console and check.md show them."""
    cells = [r["op"], r["backend"], r["dtype"], r["shape"]]
    if r["kind"] == "correctness":
        return cells + [f"{r['max_err']:.2e}", f"{r['tol']:.1e}", r["worst"], "ok" if r["ok"] else fail]
    thr = f"{r['throughput']:.3g} {r['unit']}/s" if r.get("throughput") is not None else ""
    return cells + [f"{r['us']:.1f}", thr] + [_fmt(r.get(k), ".2f") for k in ("x_torch", "x_eager", "x_compile")]


def _head(op: str, backend: str, dtype: str, shape: str) -> str:
    return f"{op:<14} {backend:<7} {dtype:<9} {shape:<28}"


def format_row(r: dict) -> str:
    c = _cells(r)
    if r["kind"] == "correctness":
        err = f"{c[4]} / {c[5]} ({c[6]})"
        return f"{_head(*c[:4])} {err:<34} {c[7]}"
    return f"{_head(*c[:4])} {c[4]:>10} µs {c[5]:>14} ×torch {c[6]:>5} ×eager {c[7]:>5} ×compile {c[8]:>5}"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    env = report["env"]
    where = f"{env.get('gpu', 'CPU')} (capability {env['capability']})" if env["device"] == "cuda" else \
        f"CPU, {env['cpu_threads']} threads"
    lines = [f"# madfast check — {where}", "",
             f"{env['date']}; madfast {env['madfast']} ({env['commit']}); torch {env['torch']} (CUDA {env['cuda']}); "
             f"triton {env['triton']}; Python {env['python']}"
             + (f"; driver {env['driver']}" if env.get("driver") else ""),
             "", f"Command: `{' '.join(report['argv'])}`", "",
             "## Correctness (error vs fp64 eager / tolerance = max(2× or 3× eager's same-dtype error, floor))", "",
             "| op | backend | dtype | shape | max rel. error | tolerance | worst | status |",
             "|---|---|---|---|---:|---:|---|---|"]
    lines += [_md_row(_cells(r, fail="**FAIL**")) for r in report["results"] if r["kind"] == "correctness"]
    lines += ["", "## Speed (forward + backward, median; × = baseline time / this time)", "",
              "| op | backend | dtype | shape | µs | throughput | × torch path | × eager | × compile |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [_md_row(_cells(r)) for r in report["results"] if r["kind"] == "speed"]
    if report["skipped"]:
        lines += ["", "## Not run", ""] + [f"- {s}" for s in report["skipped"]]
    if report["verified_entries"]:
        lines += ["", "## Verified-dispatch entries", "", "| op | backend | dtype | × torch (geomean) | ok |",
                  "|---|---|---|---:|---|"]
        lines += [f"| {e['op']} | {e['backend']} | {e['dtype']} | {e['ratio']:.2f} | {e['ok']} |"
                  for e in report["verified_entries"]]
    s = report["summary"]
    lines += ["", f"{s['checked']} correctness rows, {s['failures']} failures, {s['timed']} speed rows; "
              f"{'finished' if s['finished'] else 'cut short'} in {s['seconds']:.0f} s.", ""]
    return "\n".join(lines)


# ---- the run ------------------------------------------------------------------------------------
def _available(case: Case, device: torch.device, skipped: list[str]) -> list[str]:
    """torch, then every fused backend of the case's ops that runs on ``device``."""
    names = ["torch"]
    for b in _backend.OPS[case.dispatches[0]].kernels:
        try:
            for op in case.dispatches:
                _backend.choose(op, b, device)
            names.append(b)
        except _backend.BackendUnavailableError as e:
            skipped.append(f"{case.name} / {b}: {e}")
    return names


class _Plain:
    """The progress bar's interface without tqdm (a bare GPU machine may lack it)."""

    def write(self, line: str) -> None:
        print(line, flush=True)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Plain()
    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="check", leave=False)


def run_check(opts: CheckOptions) -> int:
    """Runs the check; returns the exit status (1 when any correctness check failed)."""
    started = time.perf_counter()
    env = environment(opts.device)
    report = {"format": FORMAT, "env": env, "argv": opts.argv, "results": [], "skipped": [],
              "verified_entries": [], "summary": {}}
    json_path, md_path = opts.out / "check.json", opts.out / "check.md"

    def flush(finished: bool) -> None:
        rows = report["results"]
        report["summary"] = {"checked": sum(r["kind"] == "correctness" for r in rows),
                             "failures": sum(r["kind"] == "correctness" and not r["ok"] for r in rows),
                             "timed": sum(r["kind"] == "speed" for r in rows), "finished": finished,
                             "seconds": time.perf_counter() - started}
        # derived on every write: a run cut short keeps the entries of all it timed
        report["verified_entries"] = verified_entries(rows, env)
        _atomic_write(json_path, json.dumps(report, indent=1))
        _atomic_write(md_path, markdown(report))
        if opts.timing:
            _atomic_write(opts.out / "verified-entries.json", json.dumps({"entries": report["verified_entries"]},
                                                                        indent=1))

    # dtype-major (the order of --dtypes, fp32 first by default): a run cut short has every op in
    # the dtypes that matter most
    plan = []  # (case, backends, dtype, shape)
    backends = {name: _available(CASES[name], opts.device, report["skipped"]) for name in opts.ops}
    for dtype in opts.dtypes:
        for name in opts.ops:
            case = CASES[name]
            if dtype not in case.dtypes:
                report["skipped"].append(f"{name} / {_dtype_name(dtype)}: not an input dtype of this op's check")
                continue
            plan += [(case, backends[name], dtype, shape) for shape in case.shapes(opts.batch_divisor, opts.quick)
                     if shape.headline or not opts.headline]
    n_units = sum(len(b) for _, b, _, _ in plan) + sum(opts.timing for *_, s in plan if not s.odd)
    bar = _progress(n_units, opts.progress)

    def emit(row: dict) -> None:
        report["results"].append(row)
        bar.write(format_row(row))
        flush(False)

    bar.write(f"{_head('op', 'backend', 'dtype', 'shape')} error / tolerance / µs, throughput, ratios")
    # Correctness of everything first: it is what a short GPU window must not miss.
    for case, backends, dtype, shape in plan:
        for b in backends:
            t0 = time.perf_counter()
            try:
                result = check_correctness(case, b, shape, dtype, opts.device)
            except Exception as e:  # noqa: BLE001 - a crash is a failure of that kernel, reported, not fatal
                result = {"ok": False, "ratio": math.inf, "max_err": math.inf,
                          "tol": floor(dtype, opts.device, case.convolution), "worst": "error",
                          "error": f"{type(e).__name__}: {e}"[:500]}
            emit({"kind": "correctness", "op": case.name, "backend": b, "dtype": _dtype_name(dtype),
                  "shape": shape.label, **result, "dispatch_ops": list(case.dispatches),
                  "seconds": round(time.perf_counter() - t0, 3)})  # on a GPU: mostly JIT compilation
            bar.update()
    # Then speed, first without torch.compile (what verified dispatch needs), then compile's times added
    # to those rows (each compile takes seconds to minutes) while the time budget lasts.
    def over_budget(what: str) -> bool:
        if opts.time_budget_s is not None and time.perf_counter() - started > opts.time_budget_s:
            report["skipped"].append(f"{what}: skipped (--time-budget {opts.time_budget_s:g} s spent)")
            return True
        return False

    budget_s = 0.05 if opts.quick else 0.3
    timed_units = []  # (case, shape, dtype, what, its speed rows)
    for case, backends, dtype, shape in plan if opts.timing else ():
        if shape.odd:
            continue
        bar.update()
        what = f"{case.name} / {_dtype_name(dtype)} / {shape.label}"
        if over_budget(f"timing {what}"):
            continue
        # the Triton interpreter's speed means nothing
        timed = [b for b in backends if not (b == "triton" and opts.device.type == "cpu")]
        try:
            times = time_case(case, {"eager": case.eager, **{b: case.fused(b) for b in timed}}, shape, dtype,
                              opts.device, budget_s)
        except Exception as e:  # noqa: BLE001
            report["skipped"].append(f"timing {what} failed: {type(e).__name__}: {e}"[:500])
            continue
        unit, work = case.work(shape, dtype)
        rows = []
        for b in timed:
            t = times[b]
            rows.append({"kind": "speed", "op": case.name, "backend": b, "dtype": _dtype_name(dtype),
                         "shape": shape.label, "us": t * 1e6, "unit": unit,
                         "throughput": work / t / (1e12 if unit == "TFLOP" else 1e9),
                         "eager_us": times["eager"] * 1e6, "compile_us": None, "x_torch": times["torch"] / t,
                         "x_eager": times["eager"] / t, "x_compile": None, "dispatch_ops": list(case.dispatches)})
            emit(rows[-1])
        timed_units.append((case, shape, dtype, what, rows))
    for case, shape, dtype, what, rows in timed_units if opts.compile else ():
        if over_budget(f"torch.compile timing {what}"):
            continue
        try:
            torch._dynamo.reset()  # compiled afresh for each problem: no recompile limit
            t = time_case(case, {"compile": torch.compile(case.eager)}, shape, dtype, opts.device, budget_s)["compile"]
        except Exception as e:  # noqa: BLE001 - a compiler failure is a note, not a kernel failure
            report["skipped"].append(f"torch.compile timing {what} failed: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}"[:300])
            continue
        for r in rows:
            r.update(compile_us=t * 1e6, x_compile=t / (r["us"] / 1e6))
        bar.write(f"{_head(case.name, 'compile', _dtype_name(dtype), shape.label)} {t * 1e6:>10.1f} µs "
                  + " ".join(f"{r['backend']} ×{r['x_compile']:.2f}" for r in rows))
        flush(False)
    bar.close()
    flush(True)
    if opts.save:
        save_entries(report["verified_entries"])
    s = report["summary"]
    print(f"{s['checked']} correctness checks, {s['failures']} failed; {s['timed']} timings "
          f"({s['seconds']:.0f} s) → {json_path}, {md_path}")
    return 1 if s["failures"] else 0


def save_entries(entries: list[dict]) -> Path:
    path = _verified.cache_file()
    merged = _verified.merge_entries(_verified.read_entries(path), entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps({"entries": merged}, indent=1))
    _verified._load.cache_clear()
    return path
