"""What `--compile` compiles traces in one graph: torch._dynamo.explain finds no graph break in the
teacher (with the BN-prior hooks of the G step), the student, the generator or the EMA generator,
for every conditioning, with madfast's ops on each CPU backend, in fp32 and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from madfast import _backend
from madfast.data import Normalize
from madfast.models import Generator, build_model
from madfast.train.config import DistillConfig
from madfast.train.distributed import DistContext
from madfast.train.task import MADTask


def _task(teacher: str, student: str, conditioning: str, backend: str, amp: str, img_size: int = 16,
          channels: int = 1) -> MADTask:
    cfg = DistillConfig(dataset="digits", teacher=teacher, student=student, nz=16, ngf=8, batch_size=4,
                        conditioning=conditioning, backend=backend, amp=amp, device="cpu")
    torch.manual_seed(0)
    gen = Generator(cfg.nz, 10, img_size, channels, cfg.ngf, conditioning, backend=backend)
    return MADTask(cfg, build_model(teacher, 10, channels), build_model(student, 10, channels), gen,
                   Normalize((0.5,) * channels, (0.25,) * channels), DistContext(0, 1, torch.device("cpu")))


def _breaks(fn, *args) -> tuple[int, list]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    return explanation.graph_break_count, [str(b.reason) for b in explanation.break_reasons]


@pytest.mark.parametrize("amp", ["none", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("conditioning", ["sum", "cat", "uncond"])
def test_compiled_modules_have_no_graph_break(conditioning, backend, amp):
    try:
        _backend.choose("kl_div_fwd", backend, torch.device("cpu"))
    except _backend.BackendUnavailableError as e:
        pytest.skip(str(e))
    task = _task("small_cnn", "small_cnn_half", conditioning, backend, amp)
    z, y = task._codes(task.batch)
    with task.autocast():
        for name, module in (("generator", task.g_raw), ("ema generator", task.ema.module)):
            assert _breaks(module, z, y) == (0, []), name
        x = task.to_input(task.g_raw(z, y)).detach()
        # the G step's teacher: its BN-prior hooks run inside the compiled forward
        assert _breaks(task.teacher, x) == (0, []), "teacher"
        assert _breaks(task.student_raw, x) == (0, []), "student"


def test_the_cifar_preset_networks_have_no_graph_break():
    task = _task("cifar_resnet34", "cifar_resnet18", "sum", "auto", "none", img_size=32, channels=3)
    z, y = task._codes(2)
    x = task.to_input(task.g_raw(z, y)).detach()
    for name, module, args in (("generator", task.g_raw, (z, y)), ("teacher", task.teacher, (x,)),
                               ("student", task.student_raw, (x,))):
        assert _breaks(module, *args) == (0, []), name


def test_explain_sees_a_planted_graph_break():
    task = _task("small_cnn", "small_cnn_half", "sum", "torch", "none")
    z, y = task._codes(task.batch)
    x = task.to_input(task.g_raw(z, y)).detach()
    forward = task.student_raw.forward

    def breaking(inp):
        out = forward(inp)
        print("", end="")  # a Python side effect dynamo cannot trace
        return out * 1
    count, reasons = _breaks(breaking, x)
    assert count >= 1 and reasons
