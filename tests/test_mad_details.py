"""The MAD details the practitioners' code settles: uncond's CE target, G̃'s start after G's
pre-training, the student's mode in the G step, a shared class table — each against fp64 values
computed here."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from madfast.data import Normalize
from madfast.models import Generator
from madfast.models.small_cnn import SmallCNN
from madfast.train import DistillConfig
from madfast.train.distributed import DistContext
from madfast.train.task import MADTask

B, NZ, C = 8, 8, 10


def _teacher() -> nn.Module:
    t = SmallCNN(C, 1, width=4)
    g = torch.Generator().manual_seed(1)
    for bn in (m for m in t.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return t


def make_task(**overrides) -> MADTask:
    values = dict(dataset="digits", nz=NZ, ngf=4, batch_size=B, steps=20, g_pretrain_steps=0, s_steps=1,
                  lambda_ce=1.0, lambda_bn=0.0, adv_bound=None, grad_clip=0.0, device="cpu", lr_g=1e-2)
    values.update(overrides)
    cfg = DistillConfig(**values).validate()
    torch.manual_seed(0)
    gen = Generator(NZ, C, 16, 1, 4, cfg.conditioning, cfg.gen_block, cfg.gen_output)
    student = SmallCNN(C, 1, width=2)  # has BatchNorm: its mode matters
    return MADTask(cfg, _teacher(), student, gen, Normalize((0.5,), (0.5,)), DistContext())


def f64(m: nn.Module) -> nn.Module:
    memo = {id(v): type(v)() for mod in m.modules() for k, v in vars(mod).items() if "hook" in k and isinstance(v, dict)}
    return copy.deepcopy(m, memo).double()


def record(module: nn.Module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append([a.detach().clone() for a in args]))
    return calls


@pytest.mark.parametrize("conditioning", ["uncond", "sum"])
def test_ce_target_is_teacher_argmax_for_uncond_and_the_label_otherwise(conditioning):
    task = make_task(conditioning=conditioning)
    g64, t64 = f64(task.g_raw), f64(task.teacher)
    codes = record(task.g_raw)
    out = task.generator_step(pretrain=True)
    z, y = codes[0]  # G is always called with labels; uncond ignores them
    with torch.no_grad():
        logits = t64(g64(z.double(), y))  # tanh → [0, 1] → (x − 0.5)/0.5 is the identity here
    want = F.cross_entropy(logits, logits.argmax(1) if conditioning == "uncond" else y).item()
    assert out["g_ce"].item() == pytest.approx(want, rel=1e-4)
    other = F.cross_entropy(logits, y if conditioning == "uncond" else logits.argmax(1)).item()
    assert abs(other - want) > 1e-3  # the two targets are distinguishable here


@pytest.mark.parametrize("from_pretrained", [True, False])
def test_ema_generator_starts_from_the_pretrained_generator(from_pretrained):
    task = make_task(g_pretrain_steps=2, ema_from_pretrained=from_pretrained)
    with torch.no_grad():  # an EMA far from G: a missing set() cannot hide
        for p in task.ema.module.parameters():
            p.add_(torch.randn_like(p))
    ema0 = [p.detach().double().clone() for p in task.ema.module.parameters()]
    task.iteration(0)
    task.iteration(1)
    assert all(torch.equal(a, b.double()) for a, b in zip(ema0, task.ema.module.parameters()))  # untouched in pretraining
    g_pre = [p.detach().double().clone() for p in task.g_raw.parameters()]
    task.iteration(2)  # first adversarial iteration: (set), G step, EMA step
    start = g_pre if from_pretrained else ema0
    for s, e, g in zip(start, task.ema.module.parameters(), task.g_raw.parameters()):
        torch.testing.assert_close(e.double(), 0.95 * s + 0.05 * g.double(), rtol=1e-6, atol=1e-6)
    task.iteration(3)  # only once: later iterations average again
    assert not all(torch.equal(e, g) for e, g in zip(task.ema.module.parameters(), task.g_raw.parameters()))


def _bn_stats(m):
    return [b.clone() for n, b in m.named_buffers() if "running" in n]


@pytest.mark.parametrize("eval_mode", [True, False])
def test_student_mode_in_the_generator_step(eval_mode):
    task = make_task(student_eval_in_g_step=eval_mode, lambda_ce=0.0)
    before, s64 = _bn_stats(task.student_raw), f64(task.student_raw).train(not eval_mode)
    t64, g64 = f64(task.teacher), f64(task.g_raw)
    codes = record(task.g_raw)
    out = task.generator_step()
    z, y = codes[0]
    with torch.no_grad():
        x = g64(z.double(), y)
        t, s = t64(x), s64(x)
    kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean().item()
    assert out["g_adv"].item() == pytest.approx(-kl, rel=1e-4)  # the student's forward in that mode
    moved = any(not torch.equal(a, b) for a, b in zip(before, _bn_stats(task.student_raw)))
    assert moved == (not eval_mode)
    assert task.student_raw.training  # back in train mode for its own step


def test_shared_class_embedding():
    task = make_task(share_embedding=True, g_pretrain_steps=0)
    assert task.ema.module.embed is task.g_raw.embed
    fc0 = task.ema.module.fc.weight.detach().clone()
    task.iteration(0)
    assert torch.equal(task.ema.module.embed.weight, task.g_raw.embed.weight)
    torch.testing.assert_close(task.ema.module.fc.weight, 0.05 * task.g_raw.fc.weight.detach() + 0.95 * fc0)
    not_shared = make_task()
    not_shared.iteration(0)
    assert not torch.equal(not_shared.ema.module.embed.weight, not_shared.g_raw.embed.weight)
