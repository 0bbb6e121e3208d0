"""`madfast check` rehearsed on the CPU, the verified-dispatch rule on simulated GPUs and cache files,
bad input, and the GPU script's dry run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import madfast
from madfast import _backend, _verified
from madfast.check import CheckOptions, options, run_check
from madfast.check.cases import CASES
from madfast.cli import main
from mad_helpers import MadfastOps

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"kind", "op", "backend", "dtype", "shape"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `madfast check --device cpu --quick` over every op, as a user would run it."""
    out = tmp_path_factory.mktemp("check")
    env = {**os.environ, "TRITON_INTERPRET": "1", "MADFAST_CACHE_DIR": str(out / "cache")}
    proc = subprocess.run([sys.executable, "-m", "madfast", "check", "--device", "cpu", "--quick", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    return proc, out


@pytest.mark.slow
def test_quick_cpu_check_end_to_end(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "check.json").read_text())
    assert report["format"] == "madfast-check/1"
    assert report["summary"]["finished"] and report["summary"]["failures"] == 0
    for key in ("date", "commit", "torch", "triton", "cuda", "python", "device", "cpu_threads"):
        assert key in report["env"]
    rows = report["results"]
    assert all(ROW_KEYS <= set(r) for r in rows)
    checked = {(r["op"], r["backend"], r["dtype"]) for r in rows if r["kind"] == "correctness"}
    for op, case in CASES.items():
        backends = ["torch"] + [b for b in _backend.OPS[case.dispatches[0]].kernels if b != "cuda"]
        assert ("aten" in backends) == (op in ("upsample_conv", "block")) and "triton" in backends
        for b in backends:
            if any(f"{op} / {b}:" in s for s in report["skipped"]):
                continue  # named, with the reason, under "Not run"
            for dtype in case.dtypes:
                assert (op, b, str(dtype)[6:]) in checked, (op, b, dtype)
    for r in rows:
        if r["kind"] == "correctness":
            assert r["ok"] and r["max_err"] <= r["tol"], r
            assert r["dispatch_ops"] == [*CASES[r["op"]].dispatches], r
    speed = [r for r in rows if r["kind"] == "speed"]
    assert {r["backend"] for r in speed} >= {"torch", "cpp"} and "triton" not in {r["backend"] for r in speed}
    assert all(r["us"] > 0 and r["x_eager"] > 0 and r["x_compile"] is None for r in speed)  # --quick: no compile
    md = (out / "check.md").read_text()
    assert "| op | backend | dtype | shape | max rel. error |" in md and "## Speed" in md
    assert all(f"| {op} |" in md for op in CASES)
    assert json.loads((out / "verified-entries.json").read_text()) == {"entries": []}  # CPU: nothing to verify
    assert "correctness checks, 0 failed" in proc.stdout


def _opts(tmp_path, ops, dtypes=(torch.float32,), **kw) -> CheckOptions:
    return CheckOptions(device=torch.device("cpu"), ops=ops, dtypes=dtypes, out=tmp_path, quick=True,
                        compile=False, progress=False, batch_divisor=8, **kw)


def _perturb(monkeypatch, name, wrong):
    """Replaces madfast.ops.<name> on the fused backends only (the torch path stays right)."""
    real = getattr(madfast.ops, name)
    monkeypatch.setattr(madfast.ops, name, lambda *a, backend, **k: (real if backend == "torch" else wrong(real))(
        *a, backend=backend, **k))


def _rows(out: Path) -> list[dict]:
    return [r for r in json.loads((out / "check.json").read_text())["results"] if r["kind"] == "correctness"]


def test_inputs_are_the_same_in_every_process():
    """A rerun checks the same values: the input seed must not come from the salted str hash."""
    code = ("from madfast.check.cases import CASES; from madfast.check.runner import _inputs; import torch; "
            "c = CASES['kl']; s = c.shapes(1, True)[0]; "
            "print(sum(float(t.double().sum()) for t in _inputs(c, s, torch.float32, torch.device('cpu'))))")
    sums = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(sums) == 1, sums


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_case_runs_the_kernels_it_declares(name):
    """A case's ``dispatches`` is what its verified entries are filed under: on every fused CPU
    backend but the interpreter, its forward and backward must run those ops' kernels of that backend."""
    from madfast.check.runner import _available, _evaluate, _inputs

    case, device = CASES[name], torch.device("cpu")
    shape = case.shapes(1, True)[0]
    backends = [b for b in _available(case, device, []) if b not in ("torch", "triton")]
    if not backends:
        pytest.skip("no compiled CPU backend for this case here")
    for b in backends:
        with MadfastOps() as seen:
            _evaluate(case, case.fused(b), _inputs(case, shape, torch.float32, device), None)
        for op in case.dispatches:
            fwd, bwd = _backend.OPS[op].kernels[b]
            assert fwd in seen.ops and (bwd is None or not case.grads or bwd in seen.ops), (b, op, seen.ops)


def test_a_perturbed_kernel_fails_the_check(tmp_path, monkeypatch):
    """A fused kernel off by 1 %: exit status 1, FAIL in the rows and the table, the torch path ok."""
    _perturb(monkeypatch, "kl_div", lambda real: lambda *a, **k: real(*a, **k) * 1.01)
    assert run_check(_opts(tmp_path, ("kl",))) == 1
    rows = _rows(tmp_path)
    fused = [r for r in rows if r["backend"] != "torch" and r["shape"] != "1×1"]  # KL over one class is 0
    assert fused and not any(r["ok"] for r in fused)
    assert all(r["ok"] for r in rows if r["backend"] == "torch")
    assert "**FAIL**" in (tmp_path / "check.md").read_text()


def test_a_wrong_gradient_fails_the_check(tmp_path, monkeypatch):
    """Right values, a gradient 1 % off."""
    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    _perturb(monkeypatch, "bn_stat_loss", lambda real: lambda x, *a, **k: real(ScaleGrad.apply(x), *a, **k))
    assert run_check(_opts(tmp_path, ("bn_stats",))) == 1
    bad = [r for r in _rows(tmp_path) if not r["ok"]]
    assert bad and all(r["worst"] == "grad0" and r["backend"] != "torch" for r in bad)


def test_an_ema_that_does_nothing_fails_in_bf16(tmp_path, monkeypatch):
    _perturb(monkeypatch, "ema_update_", lambda real: lambda *a, **k: None)
    assert run_check(_opts(tmp_path, ("ema",), dtypes=(torch.bfloat16,))) == 1
    assert not any(r["ok"] for r in _rows(tmp_path) if r["backend"] != "torch")


def test_a_crashing_kernel_is_a_failure_not_a_crash(tmp_path, monkeypatch):
    def boom(real):
        def run(*a, **k):
            raise RuntimeError("illegal memory access")
        return run
    _perturb(monkeypatch, "adversarial_loss", boom)
    assert run_check(_opts(tmp_path, ("adversarial",))) == 1
    assert any("illegal memory access" in r.get("error", "") for r in _rows(tmp_path))


def test_compile_is_timed_when_asked(tmp_path):
    opts = dataclasses.replace(_opts(tmp_path, ("bn_lrelu",)), compile=True)
    assert run_check(opts) == 0
    speed = [r for r in json.loads((tmp_path / "check.json").read_text())["results"] if r["kind"] == "speed"]
    assert speed and all(r["compile_us"] is not None and r["x_compile"] > 0 for r in speed)


def test_headline_runs_only_the_headline_shapes_and_no_timing_times_nothing(tmp_path):
    ops = ("ema", "bn_stats", "bn_lrelu")
    (tmp_path / "h").mkdir(), (tmp_path / "c").mkdir()
    assert run_check(dataclasses.replace(_opts(tmp_path / "h", ops), headline=True)) == 0
    rows = json.loads((tmp_path / "h" / "check.json").read_text())["results"]
    headline = {(op, s.label) for op in ops for s in CASES[op].shapes(8, True) if s.headline}
    assert {(r["op"], r["shape"]) for r in rows} == headline  # every headline shape, checked and timed
    assert {r["kind"] for r in rows} == {"correctness", "speed"}
    assert run_check(dataclasses.replace(_opts(tmp_path / "c", ops), timing=False)) == 0
    rows = json.loads((tmp_path / "c" / "check.json").read_text())["results"]
    assert {r["kind"] for r in rows} == {"correctness"} and any(r["shape"].startswith("1") for r in rows)  # odd too
    assert not (tmp_path / "c" / "verified-entries.json").exists()


def test_verified_entries_are_written_as_the_run_goes(tmp_path, monkeypatch):
    """A GPU window can end mid-run: the entries of every op timed so far must already be on disk."""
    from madfast.check import runner

    gpu = {**runner.environment(torch.device("cpu")), "device": "cuda", "gpu": "H100", "capability": "9.0"}
    monkeypatch.setattr(runner, "environment", lambda device: gpu)
    time_case = runner.time_case

    def cut_after_the_first_op(case, *a, **k):
        if case.name != "ema":
            raise KeyboardInterrupt  # the device call's time limit
        return time_case(case, *a, **k)
    monkeypatch.setattr(runner, "time_case", cut_after_the_first_op)
    with pytest.raises(KeyboardInterrupt):
        run_check(dataclasses.replace(_opts(tmp_path, ("ema", "bn_lrelu")), headline=True))
    entries = json.loads((tmp_path / "verified-entries.json").read_text())["entries"]
    assert {(e["op"], e["backend"]) for e in entries} == {("ema_update_", "cpp")}
    assert json.loads((tmp_path / "check.json").read_text())["verified_entries"] == entries


# ---- verified dispatch ----------------------------------------------------------------------------
def entry(op="kl_div_fwd", backend="cuda", dtype="float32", capability="9.0", ratio=1.5, ok=True):
    return {"op": op, "backend": backend, "dtype": dtype, "gpu": "NVIDIA H100", "capability": capability,
            "ratio": ratio, "ok": ok, "date": "2026-11-26", "commit": "abc"}


@pytest.mark.parametrize("entries, dtype, verified", [
    ([entry()], torch.float32, True),
    ([entry()], None, True),
    ([entry(ratio=0.99)], torch.float32, False),  # slower than torch: not taken
    ([entry(ok=False, ratio=3.0)], torch.float32, False),  # fast but wrong: not taken
    ([entry(capability="8.0")], torch.float32, False),  # measured on another architecture
    ([entry(dtype="bfloat16")], torch.float32, False),  # measured in another dtype
    ([entry(), entry(dtype="bfloat16", ratio=0.5)], None, False),  # dtype unknown: every measurement must pass
    ([entry(), entry(dtype="bfloat16", ratio=0.5)], torch.float32, True),
    ([entry(backend="triton")], torch.float32, False),
    ([], torch.float32, False),
])
def test_is_verified(entries, dtype, verified):
    assert _verified.is_verified("kl_div_fwd", "cuda", "9.0", dtype, entries) is verified


@pytest.fixture
def simulated_gpu(monkeypatch):
    """A CUDA device whose capability and available backends are simulated (no GPU needed)."""
    def use(capability: str, entries: list[dict]):
        monkeypatch.setattr(_backend, "_why_unavailable", lambda op, backend, device: None)
        monkeypatch.setattr(_verified, "capability_of", lambda device: capability)
        monkeypatch.setattr(_verified, "load_entries", lambda: tuple(entries))
        monkeypatch.delenv("MADFAST_BACKEND", raising=False)
        return torch.device("cuda")
    return use


def test_auto_on_cuda_takes_only_verified_backends(simulated_gpu):
    dev = simulated_gpu("9.0", [entry(backend="triton", ratio=1.2), entry(backend="cuda", ratio=0.8)])
    assert _backend.choose("kl_div_fwd", "auto", dev) == "triton"  # cuda first in order, but slower than torch
    assert _backend.choose("channel_moments", "auto", dev) == "torch"  # nothing measured
    assert _backend.choose("kl_div_fwd", "auto", dev, dtype=torch.bfloat16) == "torch"


def test_auto_on_another_architecture_keeps_torch(simulated_gpu):
    dev = simulated_gpu("8.9", [entry(backend="cuda"), entry(backend="triton")])
    assert _backend.choose("kl_div_fwd", "auto", dev) == "torch"


def test_explicit_backends_override_verification(simulated_gpu, monkeypatch):
    dev = simulated_gpu("9.0", [])
    assert _backend.choose("kl_div_fwd", "cuda", dev) == "cuda"
    monkeypatch.setenv("MADFAST_BACKEND", "triton")
    assert _backend.choose("kl_div_fwd", "auto", dev) == "triton"


def test_auto_on_cpu_is_unchanged_by_verification():
    assert _backend.choose("kl_div_fwd", "auto", torch.device("cpu")) == "cpp"


def test_the_user_cache_adds_and_replaces_packaged_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("MADFAST_CACHE_DIR", str(tmp_path))
    packaged = tmp_path / "packaged.json"
    packaged.write_text(json.dumps({"entries": [entry(ratio=0.5), entry(op="l1_fwd")]}))
    monkeypatch.setattr(_verified, "PACKAGED", packaged)
    (tmp_path / "verified.json").write_text(json.dumps({"entries": [entry(ratio=2.0)]}))
    _verified._load.cache_clear()
    try:
        got = {(e["op"], e["ratio"]) for e in _verified.load_entries()}
        assert got == {("kl_div_fwd", 2.0), ("l1_fwd", 1.5)}
        assert _verified.is_verified("kl_div_fwd", "cuda", "9.0", torch.float32)
    finally:
        _verified._load.cache_clear()


@pytest.mark.parametrize("text", ["{not json", json.dumps({"entries": [{"op": "kl_div_fwd"}]}), "[]"])
def test_a_corrupt_cache_is_ignored_with_a_warning(tmp_path, monkeypatch, text):
    monkeypatch.setenv("MADFAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MADFAST_BACKEND", raising=False)
    (tmp_path / "verified.json").write_text(text)
    monkeypatch.setattr(_backend, "_why_unavailable", lambda op, backend, device: None)
    monkeypatch.setattr(_verified, "capability_of", lambda device: "9.0")
    _verified._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="verified-dispatch file"):
            assert _backend.choose("kl_div_fwd", "auto", torch.device("cuda")) == "torch"
    finally:
        _verified._load.cache_clear()


def test_the_packaged_file_is_well_formed():
    for e in _verified.read_entries(_verified.PACKAGED):
        assert set(_verified.REQUIRED_KEYS) <= set(e)


def test_entries_from_a_gpu_run():
    """ok only when every correctness row of (op, backend, dtype) passed; ratio the geometric mean."""
    from madfast.check.runner import verified_entries

    def row(kind, backend="cuda", ok=True, x=None, op="kl"):
        return {"kind": kind, "op": op, "backend": backend, "dtype": "float32", "shape": "s", "ok": ok,
                "x_torch": x, "dispatch_ops": ["kl_div_fwd"]}
    env = {"device": "cuda", "gpu": "H100", "capability": "9.0", "date": "2026-11-26T00:00", "commit": "c",
           "torch": "2.11", "triton": "3.6"}
    rows = [row("correctness"), row("correctness", op="adversarial", ok=False), row("speed", x=2.0),
            row("speed", x=8.0), row("correctness", backend="torch"), row("speed", backend="torch", x=1.0),
            row("correctness", backend="triton")]  # triton: checked but never timed → no entry
    (e,) = verified_entries(rows, env)
    assert (e["op"], e["backend"], e["ok"], e["ratio"], e["check_ops"]) == ("kl_div_fwd", "cuda", False, 4.0,
                                                                             ["adversarial", "kl"])
    assert verified_entries(rows, {**env, "device": "cpu"}) == []


# ---- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--ops", "kl,softmax"], "--ops: unknown name(s) softmax"),
    (["--dtypes", "float8"], "--dtypes: unknown name(s) float8"),
    (["--device", "tpu"], "--device must be cuda or cpu"),
    (["--save"], "--save: verified dispatch applies to CUDA GPUs"),
    (["--save", "--no-timing"], "--save needs the timings that --no-timing skips"),
    (["--time-budget", "0"], "--time-budget must be > 0"),
] + ([] if torch.cuda.is_available() else [([], "--device cuda: no CUDA GPU")]))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "check.json").write_text("previous results")
    device = [] if "--device" in argv or not argv else ["--device", "cpu"]
    assert main(["check", "--out", str(out), *device, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in out.iterdir()) == ["check.json"]
    assert (out / "check.json").read_text() == "previous results"


def test_an_unwritable_out_is_named(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["check", "--device", "cpu", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not a writable folder" in err


def test_save_refuses_a_corrupt_cache_and_leaves_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MADFAST_CACHE_DIR", str(tmp_path))
    (tmp_path / "verified.json").write_text("{corrupt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="verified-dispatch file .* is unreadable"):
        options("cuda", None, None, str(tmp_path / "out"), True, None, True, None, False, [])
    assert (tmp_path / "verified.json").read_text() == "{corrupt"
    assert not (tmp_path / "out").exists()


# ---- the GPU script ---------------------------------------------------------------------------------
def _gpu_steps(script: str, *args: str, **env) -> tuple[list[str], str]:
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / script), "--dry-run", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable, **env})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("== ") and "limit" in line]
    return [line.split(" (limit")[0].split(" ", 2)[2] for line in lines], proc.stdout


def test_gpu_check_dry_run_lists_the_steps_in_order(tmp_path):
    """By value per second: build, the whole iteration (both cases), the headline check (the verified
    entries), every shape's correctness, the tests."""
    steps, stdout = _gpu_steps("gpu_check.sh", str(tmp_path / "o"))
    assert steps == ["build", "step r34_r18_32px_b256", "step r50_r18_224px_b64", "headline", "check", "tests"]
    assert "madfast bench step --case r34_r18_32px_b256 --device cuda --providers eager,default,default_compile" in stdout
    assert "madfast check --device cuda --headline --dtypes float32,bfloat16" in stdout
    assert "madfast check --device cuda --no-timing --out" in stdout
    assert "TORCH_CUDA_ARCH_LIST=" in stdout
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["build.log"]  # nothing run
    _, short = _gpu_steps("gpu_check.sh", str(tmp_path / "t"), TOTAL_S="100")
    limits = [int(line.split("(limit ")[1].split("s)")[0]) for line in short.splitlines() if "(limit" in line]
    assert limits[0] == 75 and all(50 < t <= 100 for t in limits[1:])  # no step outlasts what is left of the run
    narrowed, _ = _gpu_steps("gpu_check.sh", str(tmp_path / "n"), STEP_CASES="", CHECK_OPS="", TESTS="")
    assert narrowed == ["build", "headline"]


def _previous_gpu_run(out: Path) -> Path:
    """The files of a gpu_check.sh run that timed one case, failed kl in the headline check, did not
    time bn_lrelu in bf16, never reached the full check, and was cut short in the tests."""
    out.mkdir()
    (out / "step.log").write_text("# step cases: r34_r18_32px_b256 r50_r18_224px_b64\n")
    (out / "step.json").write_text(json.dumps({"r34_r18_32px_b256": {}}))
    rows = [{"kind": "correctness", "op": op, "dtype": dt, "ok": op != "kl"} for op in CASES
            for dt in ("float32", "bfloat16")]
    rows += [{"kind": "speed", "op": op, "dtype": dt} for op in CASES for dt in ("float32", "bfloat16")
             if (op, dt) != ("bn_lrelu", "bfloat16")]
    (out / "headline.json").write_text(json.dumps({"summary": {"finished": True}, "results": rows}))
    (out / "pytest.log").write_text("# tests: tests/test_a.py tests/test_b.py tests/test_c.py\n"
                                    "tests/test_a.py::test_x PASSED [ 1%]\ntests/test_a.py::test_y FAILED [ 2%]\n"
                                    "tests/test_b.py::test_z[cuda] ERROR [ 3%]\n")
    return out


def test_gpu_check_rehearsed_on_cpu(tmp_path):
    """The script itself, not its dry run: every step on a CPU, narrowed, into the 8 files a lent
    machine returns; then what a recheck would rerun."""
    out = tmp_path / "o"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "BUILD_S": "0", "STEP_CASES": "demo_cnn_16px_b64",
           "STEP_PROVIDERS": "eager,default", "HEADLINE_OPS": "ema,bn_lrelu", "HEADLINE_DTYPES": "float32",
           "CHECK_OPS": "bn_lrelu", "TESTS": "tests/test_presets.py", "MADFAST_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["build.log", "check.json", "check.log", "headline.json",
                                                    "pytest.log", "step.json", "step.log", "verified-entries.json"]
    assert list(json.loads((out / "step.json").read_text())) == ["demo_cnn_16px_b64"]
    headline = json.loads((out / "headline.json").read_text())
    assert headline["summary"]["finished"] and {r["op"] for r in headline["results"]} == {"ema", "bn_lrelu"}
    assert {r["kind"] for r in headline["results"]} == {"correctness", "speed"}
    full = json.loads((out / "check.json").read_text())
    assert {(r["op"], r["kind"]) for r in full["results"]} == {("bn_lrelu", "correctness")}
    assert "passed" in (out / "pytest.log").read_text()
    steps, _ = _gpu_steps("gpu_recheck.sh", str(out), str(tmp_path / "again"))
    assert steps == ["build", "headline", "check"]  # the case it ran and its tests passed: not again


def test_what_a_gpu_run_left_to_do(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_failures import left_to_do
    finally:
        sys.path.pop(0)
    todo = left_to_do(_previous_gpu_run(tmp_path / "prev"), tuple(CASES))
    assert todo == {"STEP_CASES": "r50_r18_224px_b64", "HEADLINE_OPS": "kl,bn_lrelu", "CHECK_OPS": ",".join(CASES),
                    "TESTS": "tests/test_a.py::test_y tests/test_b.py::test_z[cuda] tests/test_c.py"}
    never = left_to_do(tmp_path / "nothing", ("kl",))  # nothing started: every step whole
    assert never["TESTS"] is None and never["STEP_CASES"] is None and never["HEADLINE_OPS"] == "kl"


def test_gpu_recheck_reruns_only_what_failed(tmp_path):
    steps, stdout = _gpu_steps("gpu_recheck.sh", str(_previous_gpu_run(tmp_path / "prev")), str(tmp_path / "o"))
    assert steps == ["build", "step r50_r18_224px_b64", "headline", "check", "tests"]
    assert "--headline --ops kl,bn_lrelu --dtypes" in stdout
    assert "pytest tests/test_a.py::test_y tests/test_b.py::test_z[cuda] tests/test_c.py -v" in stdout


def test_make_gpu_check_calls_the_script_with_out():
    proc = subprocess.run(["make", "-n", "gpu-check", "OUT=/tmp/x"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "benchmarks/gpu_check.sh /tmp/x" in proc.stdout


def test_tf32_floor_only_for_gpu_fp32_convolutions(monkeypatch):
    """fp32 convolutions on a GPU are TF32 under cudnn.allow_tf32, whichever algorithm cuDNN picks for
    eager: their floor is fp16's, nothing else's is."""
    from madfast.check.tolerances import FLOORS, floor
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert CASES["upsample_conv"].convolution and CASES["block"].convolution and not CASES["kl"].convolution
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert floor(torch.float32, cuda, convolution=True) == FLOORS[torch.float16]
    assert floor(torch.float32, cpu, convolution=True) == FLOORS[torch.float32]
    assert floor(torch.float32, cuda) == FLOORS[torch.float32]
    assert floor(torch.bfloat16, cuda, convolution=True) == FLOORS[torch.bfloat16]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert floor(torch.float32, cuda, convolution=True) == FLOORS[torch.float32]
