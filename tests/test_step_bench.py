"""`madfast bench step`: what it measures is the iteration it names, attributed to the right parts."""

from __future__ import annotations

import json

import pytest
import torch

from madfast.cli import main
from madfast.train import step_bench
from mad_helpers import MadfastOps

TINY = dict(teacher="small_cnn", student="small_cnn_half", img_size=16, batch=4)


@pytest.fixture(scope="module")
def result():
    step_bench.CASES["tiny"] = TINY
    try:
        return step_bench.bench_step("tiny", ("eager", "default"), "cpu", rounds=2, divisor=1, progress=False)
    finally:
        del step_bench.CASES["tiny"]


def _conv_flops(c_in: int, c_out: int, k: int, h: int, w: int) -> int:
    return 2 * c_in * c_out * k * k * h * w


def test_it_times_the_named_configurations(result):
    eager, default = result["providers"]["eager"], result["providers"]["default"]
    assert eager["resolved"] == dict(backend="torch", amp="none", channels_last=False, cudnn_benchmark=False,
                                     optimizer_impl="loop", compile=False, compile_mode="default")
    assert default["resolved"]["backend"] == "auto" and default["resolved"]["optimizer_impl"] == "fused"
    assert eager["speedup_vs_eager"] == 1.0
    assert default["speedup_vs_eager"] == pytest.approx(eager["median_s"] / default["median_s"])
    for r in (eager, default):
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["rounds"] == 2
        assert r["samples_per_s"] == pytest.approx(3 * result["batch"] / r["median_s"])  # G, G and G̃ batches
        assert set(r["phase_ms"]) == {"generator_step", "ema_step", "student_step"}
        assert all(v > 0 for v in r["phase_ms"].values())


def test_the_profile_charges_each_network(result):
    for r in result["providers"].values():
        nets = r["ms_by_network"]
        for part in ("teacher forward", "teacher backward", "student forward", "student backward",
                     "generator forward", "generator backward", "ema_generator forward"):
            assert nets.get(part, 0) > 0, part
        # G̃ gets no gradient and the frozen teacher none of its own: what backward the teacher shows
        # is the G step's gradient flowing through it to the image
        assert "ema_generator backward" not in nets
        assert r["ms_by_op_kind"]["convolution"] > 0
    assert result["providers"]["default"]["ms_by_op_kind"].get("madfast ops", 0) > 0
    assert result["providers"]["eager"]["ms_by_op_kind"].get("madfast ops", 0) == 0


def test_default_torch_ops_is_the_default_with_no_madfast_op():
    from dataclasses import asdict

    cpu, seen = torch.device("cpu"), {}
    for name in ("default", "default_torch_ops"):
        task = step_bench.make_task(TINY, step_bench.PROVIDERS[name](cpu), cpu)
        with MadfastOps() as mode:
            task.iteration(1)
        seen[name] = (asdict(task.cfg), mode.ops)
    (default, default_ops), (torch_ops, torch_ops_ops) = seen["default"], seen["default_torch_ops"]
    assert torch_ops.pop("backend") == "torch" and default.pop("backend") == "auto" and torch_ops == default
    assert default_ops and not torch_ops_ops


def test_counts(result):
    eager, default = result["providers"]["eager"], result["providers"]["default"]
    assert default["host_syncs"] == 0 and default["host_sync_kinds"] == []
    # torch's per-tensor Adam reads each parameter's step counter on the host
    assert eager["host_syncs"] > 0 and "Tensor.item" in eager["host_sync_kinds"]
    assert 0 < default["aten_ops"] < eager["aten_ops"]  # fused kernels dispatch fewer ops
    # small_cnn's first conv alone, forward, on the 2×batch images of a student step: a lower bound
    # that a FLOP count missing the student step would fail
    assert default["gflop_by_phase"] == eager["gflop_by_phase"]
    first = _conv_flops(3, 32, 3, 16, 16) * 2 * result["batch"] / 1e9
    assert default["gflop_by_phase"]["student_step"] > first > 0


def test_report_files(result, tmp_path):
    paths = step_bench.write_step_report(result, str(tmp_path / "step"))
    assert [p.rsplit(".", 1)[1] for p in paths] == ["json", "md", "png"]
    assert json.load(open(paths[0]))["providers"].keys() == {"eager", "default"}
    table = open(paths[1]).read()
    assert "| eager |" in table and "| default |" in table and "teacher forward" in table


def test_bad_arguments_name_the_flag(capsys):
    assert main(["bench", "step", "--providers", "eager,fastest"]) == 2
    assert "--providers" in capsys.readouterr().err
    assert main(["bench", "step", "--case", "nope"]) == 2
    assert "--case" in capsys.readouterr().err


def test_op_counter_restores_tensor_methods():
    item = torch.Tensor.item
    with step_bench.OpCounter() as counter:
        counter.label = "x"
        torch.ones(2).sum().item()
    assert torch.Tensor.item is item
    assert ("x", "Tensor.item") in counter.syncs and counter.ops >= 2
