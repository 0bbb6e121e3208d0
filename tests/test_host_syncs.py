"""The MAD loop makes no host sync between log steps, and its speed defaults resolve per device.

A host sync is anything that makes the host wait for a device value: ``.item()``, ``.tolist()``,
``bool(t)``, ``nonzero`` and the like. On a GPU each stalls the launch queue once per iteration;
they are counted on CPU tensors here, where the same calls happen."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from madfast import _backend
from madfast.train import DistillConfig, distill
from madfast.train.step_bench import OpCounter
from madfast.train.task import MADTask
from mad_helpers import tiny_config, tiny_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher"))


def _count_syncs(monkeypatch, cfg: DistillConfig) -> list[tuple[int, str]]:
    """(iteration, what) for every host sync from the first iteration on."""
    counter = OpCounter()
    iteration = MADTask.iteration

    def counted(self, step):
        counter.label = step
        return iteration(self, step)

    monkeypatch.setattr(MADTask, "iteration", counted)
    with counter:
        distill(cfg)
    return counter.syncs


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_no_host_sync_between_log_steps(monkeypatch, teacher, tmp_path, backend):
    try:
        _backend.choose("kl_div_fwd", backend, torch.device("cpu"))
    except _backend.BackendUnavailableError as e:
        pytest.skip(str(e))
    steps = 2  # iterations 0 (G pre-training) and 1 (adversarial) never log; 2, the last, does
    cfg = tiny_config(teacher, tmp_path, steps=steps, g_pretrain_steps=1, s_steps=1, log_every=1000, ckpt_every=0,
                      eval_every=0, check_teacher=False, augment=True, backend=backend)
    events = _count_syncs(monkeypatch, cfg)
    last = cfg.g_pretrain_steps + steps - 1  # the last iteration logs, evaluates and checkpoints
    assert [e for e in events if e[0] < last] == []
    assert any(e[0] == last for e in events), "the counter must see the log step's reads"


def test_a_planted_item_in_the_loop_is_counted(monkeypatch, teacher, tmp_path):
    ema_step = MADTask.ema_step

    def leaky(self):
        ema_step(self)
        float(next(self.g_raw.parameters()).sum())  # what a "print the weight norm" debug line does

    monkeypatch.setattr(MADTask, "ema_step", leaky)
    cfg = tiny_config(teacher, tmp_path, steps=4, g_pretrain_steps=0, log_every=1000, ckpt_every=0, eval_every=0,
                      check_teacher=False, backend="torch")
    events = _count_syncs(monkeypatch, cfg)
    assert {s for s, _ in events if s < 3} == {0, 1, 2}


def test_speed_defaults_resolve_per_device():
    cfg = DistillConfig()
    cuda, cpu = cfg.for_device(torch.device("cuda")), cfg.for_device(torch.device("cpu"))
    assert (cuda.amp, cuda.channels_last, cuda.cudnn_benchmark) == ("bf16", True, True)
    assert (cpu.amp, cpu.channels_last, cpu.cudnn_benchmark) == ("none", True, False)
    pinned = dataclasses.replace(cfg, amp="none", channels_last=False, cudnn_benchmark=False)
    assert pinned.for_device(torch.device("cuda")) == pinned  # a value given is never overridden


def test_every_network_runs_channels_last(teacher, tmp_path):
    from madfast.data import Normalize
    from madfast.models import Generator, build_model
    from madfast.train.distributed import DistContext

    for channels_last in (True, False):
        cfg = tiny_config(teacher, tmp_path, channels_last=channels_last)
        task = MADTask(cfg, build_model("small_cnn", 10, 1), build_model("small_cnn_half", 10, 1),
                       Generator(cfg.nz, 10, 16, 1, cfg.ngf), Normalize((0.5,), (0.25,)),
                       DistContext(0, 1, torch.device("cpu")))
        for name, net in (("teacher", task.teacher), ("student", task.student_raw), ("generator", task.g_raw),
                          ("ema generator", task.ema.module)):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            convs = [p for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1]  # 1 channel: both formats
            assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs), name


@pytest.mark.parametrize("impl, flags", [("fused", {"fused": True}), ("foreach", {"foreach": True}),
                                         ("loop", {"foreach": False})])
@pytest.mark.parametrize("optimizer_s", ["adam", "sgd"])
def test_optimizer_impl(teacher, tmp_path, impl, flags, optimizer_s):
    from madfast.data import Normalize
    from madfast.models import Generator, build_model
    from madfast.train.distributed import DistContext

    cfg = tiny_config(teacher, tmp_path, optimizer_impl=impl, optimizer_s=optimizer_s)
    task = MADTask(cfg, build_model("small_cnn", 10, 1), build_model("small_cnn_half", 10, 1),
                   Generator(cfg.nz, 10, 16, 1, cfg.ngf), Normalize((0.5,), (0.25,)),
                   DistContext(0, 1, torch.device("cpu")))
    for opt in (task.opt_g, task.opt_s):
        assert {k: opt.param_groups[0][k] for k in flags} == flags
