"""MAD's semantics on tiny deterministic setups, each checked against a formula written here in fp64.

Each test fails on one bug a reviewer planted in the trainer (and that the demo survived): the
adversarial sign flipped, the student's KL arguments swapped, τ² dropped, λ0/λ1 on the wrong
sample set, the EMA decay replaced, BN hooks recording nothing under torch.compile, the
generator's tanh → [0, 1] rescale dropped, --no-ema still feeding G̃'s samples.

The student here has no BatchNorm, so the tests hold whether the student is in train or eval mode
during the generator step; CE is weighted 0 where its target (label or teacher argmax) matters.
"""

import copy

import pytest
import torch
from torch import nn

from madfast.data import Normalize, build_dataset
from madfast.models import Generator
from madfast.models.small_cnn import SmallCNN
from madfast.train import DistillConfig
from madfast.train.distributed import DistContext
from madfast.train.task import MADTask

B, NZ, C = 8, 8, 10
MEAN, STD = 0.3, 0.4  # not digits' (0.5, 0.5): a dropped rescale cannot hide inside the normalisation


def tiny_student() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(64, C))


def tiny_teacher() -> nn.Module:
    t = SmallCNN(C, 1, width=4)
    g = torch.Generator().manual_seed(1)
    for bn in (m for m in t.modules() if isinstance(m, nn.BatchNorm2d)):  # statistics far from G's
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return t


def make_task(**overrides) -> MADTask:
    values = dict(dataset="digits", nz=NZ, ngf=4, batch_size=B, steps=20, g_pretrain_steps=0, s_steps=1,
                  lambda_ce=0.0, lambda_bn=0.0, adv_bound=None, grad_clip=0.0, device="cpu", backend="auto")
    values.update(overrides)
    cfg = DistillConfig(**values).validate()
    torch.manual_seed(0)
    gen = Generator(NZ, C, 16, 1, 4, cfg.conditioning, cfg.gen_block, cfg.gen_output)
    return MADTask(cfg, tiny_teacher(), tiny_student(), gen, Normalize((MEAN,), (STD,)), DistContext())


def kl_rows(s, t, tau):
    """KL(softmax(t/τ) ‖ softmax(s/τ))·τ² per row, from its definition."""
    p_t = torch.softmax(t / tau, 1)
    return (p_t * (torch.log_softmax(t / tau, 1) - torch.log_softmax(s / tau, 1))).sum(1) * tau**2


def to_input(img, gen_output="tanh"):
    """Generator output → teacher input: [-1, 1] → [0, 1] (tanh only), then (x − mean)/std."""
    x = (img + 1) / 2 if gen_output == "tanh" else img
    return (x - MEAN) / STD


def f64(module: nn.Module) -> nn.Module:
    """An fp64 copy without the original's hooks (BNStatHook's hold graph tensors)."""
    memo = {id(v): type(v)() for m in module.modules() for k, v in vars(m).items()
            if "hook" in k and isinstance(v, dict)}
    return copy.deepcopy(module, memo).double()


def record_inputs(module: nn.Module) -> list:
    """Every call's positional inputs, detached."""
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append([a.detach().clone() for a in args]))
    return calls


def discrepancy(teacher64, student64, x):
    with torch.no_grad():
        return kl_rows(student64(x), teacher64(x), 1.0).mean().item()


def params(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


# ---------------------------------------------------------------- generator step


def test_generator_step_raises_the_discrepancy_and_reports_minus_kl():
    task = make_task(lr_g=1e-2)
    g0, s0 = f64(task.g_raw), params(task.student_raw)
    t64 = f64(task.teacher)
    codes = record_inputs(task.g_raw)
    out = task.generator_step()
    z, y = codes[0]
    x0 = to_input(g0(z.double(), y))
    d_before = discrepancy(t64, f64(task.student_raw), x0)
    # L_G's adversarial term is −D(T(x), S(x)) with D = KL(T‖S), on G's own samples
    assert out["g_adv"].item() == pytest.approx(-d_before, rel=1e-4)
    d_after = discrepancy(t64, f64(task.student_raw), to_input(f64(task.g_raw)(z.double(), y)))
    assert d_after > d_before * 1.01, (d_before, d_after)  # G moved up the discrepancy, not down
    assert all(torch.equal(a, b) for a, b in zip(s0, params(task.student_raw)))  # S untouched by L_G


def test_adversarial_bound_stops_the_generator():
    """Past δ the adversarial gradient is exactly zero: with λ_ce = λ_bn = 0, G does not move."""
    probe = make_task()
    codes = record_inputs(probe.g_raw)
    probe.generator_step()
    z, y = codes[0]
    d = discrepancy(f64(probe.teacher), f64(probe.student_raw), to_input(f64(make_task().g_raw)(z.double(), y)))
    task = make_task(adv_bound=d / 2, lr_g=1e-2)
    g0 = params(task.g_raw)
    out = task.generator_step()
    assert out["g_adv"].item() == pytest.approx(-d / 2, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(g0, params(task.g_raw)))


# ---------------------------------------------------------------- student step


def expected_student_update(s64, t64, x, lr, tau, lam0, lam1, ema):
    """−lr·∇θ [λ0·KL(T‖S) on G's rows + λ1·KL(T‖S) on G̃'s rows], from the first SGD step (momentum
    buffer = gradient), and the losses, all in fp64, for the student ``s64`` before the step."""
    with torch.no_grad():
        t = t64(x)
    s = s64(x)
    rows = kl_rows(s, t, tau)
    kl_g = rows[:B].mean()
    if ema:
        kl_e = rows[B:].mean()
        loss = lam0 * kl_g + lam1 * kl_e
    else:
        kl_e, loss = None, kl_g
    grads = torch.autograd.grad(loss, list(s64.parameters()))
    return [-lr * g for g in grads], kl_g.item(), None if kl_e is None else kl_e.item(), loss.item()


@pytest.mark.parametrize("concat", [True, False], ids=["concat", "separate"])
def test_student_step_is_weighted_kl_teacher_to_student_on_g_and_ema_samples(concat):
    tau, lr, lam0, lam1 = 2.0, 0.1, 1.0, 0.25
    task = make_task(optimizer_s="sgd", lr_s=lr, temperature=tau, lambda0=lam0, lambda1=lam1, concat_forward=concat)
    g64, e64 = f64(task.g_raw), f64(task.ema.module)
    seen, g_codes, e_codes = record_inputs(task.student_raw), record_inputs(task.g_raw), record_inputs(task.ema.module)
    before, s64 = params(task.student_raw), f64(task.student_raw)
    out = task.student_step()
    x = torch.cat([a[0] for a in seen]).double()
    assert x.shape[0] == 2 * B  # B samples of G and B of G̃, nothing else
    (z, y), (z2, y2) = g_codes[0], e_codes[0]
    assert not torch.equal(z, z2)  # G̃ sees its own noise
    # rows [0, B) are G's samples, rows [B, 2B) are G̃'s, mapped to the teacher's input range
    torch.testing.assert_close(x[:B], to_input(g64(z.double(), y)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x[B:], to_input(e64(z2.double(), y2)), rtol=1e-5, atol=1e-5)
    steps, kl_g, kl_e, loss = expected_student_update(s64, f64(task.teacher), x, lr, tau, lam0, lam1, ema=True)
    assert out["s_kl_g"].item() == pytest.approx(kl_g, rel=1e-4)
    assert out["s_kl_ema"].item() == pytest.approx(kl_e, rel=1e-4)
    assert out["s_loss"].item() == pytest.approx(loss, rel=1e-4)
    for p0, p1, step in zip(before, params(task.student_raw), steps):
        torch.testing.assert_close((p1 - p0).double(), step, rtol=1e-3, atol=1e-3 * step.abs().max().item())


def test_no_ema_student_step_sees_only_g_samples():
    tau, lr = 1.0, 0.1
    task = make_task(ema=False, optimizer_s="sgd", lr_s=lr, temperature=tau)
    assert task.ema is None
    g64 = f64(task.g_raw)
    seen, g_codes = record_inputs(task.student_raw), record_inputs(task.g_raw)
    before, s64 = params(task.student_raw), f64(task.student_raw)
    out = task.student_step()
    x = torch.cat([a[0] for a in seen]).double()
    assert x.shape[0] == B and len(g_codes) == 1
    torch.testing.assert_close(x, to_input(g64(g_codes[0][0].double(), g_codes[0][1])), rtol=1e-5, atol=1e-5)
    steps, kl_g, _, _ = expected_student_update(s64, f64(task.teacher), x, lr, tau, 1.0, 0.0, ema=False)
    assert out["s_kl_g"].item() == pytest.approx(kl_g, rel=1e-4) and "s_kl_ema" not in out
    for p0, p1, step in zip(before, params(task.student_raw), steps):
        torch.testing.assert_close((p1 - p0).double(), step, rtol=1e-3, atol=1e-3 * step.abs().max().item())


def test_student_step_lowers_the_discrepancy_on_g_samples():
    task = make_task(lr_s=1e-2)
    seen = record_inputs(task.student_raw)
    t64 = f64(task.teacher)
    s0 = f64(task.student_raw)
    task.student_step()
    x = seen[0][0][:B].double()
    assert discrepancy(t64, f64(task.student_raw), x) < 0.99 * discrepancy(t64, s0, x)


def test_no_ema_flag_reaches_the_config():
    from madfast.cli import build_parser
    from madfast.train.config import config_from_args

    args = build_parser().parse_args(["distill", "--no-ema", "--dataset", "digits"])
    assert config_from_args(DistillConfig, args).ema is False


# ---------------------------------------------------------------- EMA generator


def test_default_ema_decay_is_the_papers_095():
    assert DistillConfig().ema_decay == 0.95


@pytest.mark.parametrize("decay", [None, 0.9], ids=["default", "0.9"])
def test_ema_step_is_alpha_old_plus_one_minus_alpha_g(decay):
    task = make_task(**({} if decay is None else {"ema_decay": decay}))
    alpha = 0.95 if decay is None else decay
    with torch.no_grad():  # G and G̃ apart, as after some G steps
        for t in (*task.g_raw.parameters(), *(b for b in task.g_raw.buffers() if b.is_floating_point())):
            t.add_(torch.randn_like(t))
    old = {k: v.clone() for k, v in task.ema.module.state_dict().items()}
    g = task.g_raw.state_dict()
    task.ema_step()
    new = task.ema.module.state_dict()
    for k, v in new.items():
        if v.is_floating_point():
            want = alpha * old[k].double() + (1 - alpha) * g[k].double()
            torch.testing.assert_close(v.double(), want, rtol=1e-6, atol=1e-6, msg=k)
        else:
            assert torch.equal(v, g[k]), k


def test_iteration_after_pretraining_updates_ema_from_the_stepped_generator():
    """A whole iteration past pre-training: G̃ ← α·G̃ + (1−α)·G after G's step, G̃ never optimised."""
    task = make_task(g_pretrain_steps=2, lr_g=1e-2)
    with torch.no_grad():
        for p in task.ema.module.parameters():
            p.add_(torch.randn_like(p))
    old = [p.detach().double().clone() for p in task.ema.module.parameters()]
    task.iteration(10)
    for o, e, g in zip(old, task.ema.module.parameters(), task.g_raw.parameters()):
        torch.testing.assert_close(e.double(), 0.95 * o + 0.05 * g.double(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- BN prior and data range


def bn_prior(teacher64: nn.Module, x: torch.Tensor) -> float:
    """Σ over every BatchNorm2d of ‖mean_c − running_mean‖₂ + ‖biased var_c − running_var‖₂ of its input."""
    total, seen = 0.0, []
    for bn in (m for m in teacher64.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.register_forward_pre_hook(lambda m, a: seen.append((m, a[0])))
    with torch.no_grad():
        teacher64(x)
    for bn, h in seen:
        mean = h.mean(dim=(0, 2, 3))
        var = ((h - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
        total += (mean - bn.running_mean).norm().item() + (var - bn.running_var).norm().item()
    assert len(seen) == 3  # SmallCNN's three BN layers
    return total


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_bn_prior_sees_every_bn_layer(compiled):
    if compiled:
        torch._dynamo.reset()
    task = make_task(lambda_bn=1.0, compile=compiled)
    g64, t64 = f64(task.g_raw), f64(task.teacher)
    # The codes the step will draw, from a copy of the task's noise stream (hooks could be traced away).
    noise = torch.Generator().set_state(task.noise.get_state())
    z = torch.randn(B, NZ, generator=noise)
    y = torch.randint(0, C, (B,), generator=noise)
    g0 = params(task.g_raw)
    out = task.generator_step(pretrain=True)
    want = bn_prior(t64, to_input(g64(z.double(), y)))
    assert out["g_bn"].item() == pytest.approx(want, rel=1e-4)
    # λ_ce = 0: only the BN prior's gradient can have moved G
    assert all(not torch.equal(a, b) for a, b in zip(g0, params(task.g_raw)) if a.dim() > 1)


@pytest.mark.parametrize("gen_output", ["tanh", "sigmoid"])
def test_teacher_sees_generator_images_in_the_data_range(gen_output):
    """tanh's [-1, 1] is mapped to the data's [0, 1], then normalised like the data."""
    task = make_task(gen_output=gen_output, lambda_bn=1.0)
    g64 = f64(task.g_raw)
    codes, inputs = record_inputs(task.g_raw), record_inputs(task.teacher)
    task.generator_step(pretrain=True)
    img = g64(codes[0][0].double(), codes[0][1])
    assert img.min() < (-0.5 if gen_output == "tanh" else 0.5)  # the raw output really spans its range
    x = inputs[0][0].double()
    torch.testing.assert_close(x, to_input(img, gen_output), rtol=1e-5, atol=1e-5)
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert lo - 1e-6 <= x.min() and x.max() <= hi + 1e-6


def test_digits_data_lies_in_zero_one():
    """The range the generator's images are mapped to is the data's own."""
    data = build_dataset("digits", "train")
    x = torch.stack([data[i][0] for i in range(0, len(data), 7)])
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
