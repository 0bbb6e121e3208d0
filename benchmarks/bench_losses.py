"""Distillation losses: eager PyTorch (the baseline), torch.compile of the same code, and each
madfast backend; forward and forward+backward.

- KL and bounded adversarial loss, B ∈ {256, 1024} × C ∈ {10, 100, 1000, 21843};
- BN-statistics loss on the BN-input shapes of a CIFAR ResNet-34 at 32 px (batch 256) and a
  ResNet-50 at 224 px (batch 64), and summed over every BN layer of one ResNet-50 forward (madfast:
  one bn_stat_losses call for all layers);
- the host time BNStatHook adds per BN layer (53 tiny layers, so kernels cost nothing).
Bytes moved (for GB/s) count one read of each input and one write of each gradient.
MADFAST_BENCH_SCALE shrinks the batch (e.g. 8 on a CPU); the group name gives the shapes run.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from madfast.ops import adversarial_loss, bn_stat_loss, kl_div
from madfast.ops.bn_stats import bn_stat_losses

SCALE = int(os.environ.get("MADFAST_BENCH_SCALE", "1"))
PROVIDERS = ["eager", "compiled", "madfast_cpp", "madfast_triton", "madfast_cuda"]
LOGIT_SHAPES = [(b // SCALE, c) for b in (256, 1024) for c in (10, 100, 1000, 21843)]
RESNET34_32PX = [(256, 64, 32, 32), (256, 128, 16, 16), (256, 256, 8, 8), (256, 512, 4, 4)]
RESNET50_224PX = [(64, 64, 112, 112), (64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
BN_SHAPES = [(max(1, n // SCALE), c, h, w) for n, c, h, w in RESNET34_32PX + RESNET50_224PX]


def eager_kl(s, t, tau=4.0):
    return F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), reduction="batchmean",
                    log_target=True) * tau**2


def eager_adversarial(s, t, bound=3.0):
    return -torch.clamp(eager_kl(s, t, 1.0), max=bound)


def eager_bn(x, rm, rv):
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    return torch.linalg.vector_norm(mean - rm) + torch.linalg.vector_norm(var - rv)


EAGER = {"kl": eager_kl, "adversarial": eager_adversarial, "bn": eager_bn}
FUSED = {
    "kl": lambda backend: lambda s, t: kl_div(s, t, 4.0, backend=backend),
    "adversarial": lambda backend: lambda s, t: adversarial_loss(s, t, 3.0, "kl", 1.0, backend=backend),
    "bn": lambda backend: lambda x, rm, rv: bn_stat_loss(x, rm, rv, backend=backend),
}
OP = {"kl": "kl_div_fwd", "adversarial": "kl_div_fwd", "bn": "bn_stat_losses"}


def loss_fn(loss: str, provider: str, device: torch.device, request):
    if provider == "eager":
        return EAGER[loss]
    if provider == "compiled":
        return torch.compile(EAGER[loss])
    from conftest import madfast_backend

    return FUSED[loss](madfast_backend(provider, OP[loss], device, request))


def step(fn, inputs, backward: bool):
    def run():
        out = fn(*inputs)
        if backward:
            out.backward()
    return run


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", LOGIT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("loss", ["kl", "adversarial"])
def test_logit_loss(benchmark, device, request, loss, shape, mode, provider):
    from conftest import timed

    fn = loss_fn(loss, provider, device, request)
    s = torch.randn(shape, device=device, requires_grad=mode == "fwd_bwd")
    t = torch.randn(shape, device=device, requires_grad=mode == "fwd_bwd")  # the generator step: both
    benchmark.group = f"{loss} {mode} {shape[0]}x{shape[1]} fp32 {device.type}"
    n = s.numel() * s.element_size()
    timed(benchmark, step(fn, (s, t), mode == "fwd_bwd"), device, bytes_moved=(4 if mode == "fwd_bwd" else 2) * n,
          provider=provider, baseline="eager")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bn_stat_loss(benchmark, device, request, shape, mode, provider):
    from conftest import timed

    fn = loss_fn("bn", provider, device, request)
    x = torch.randn(shape, device=device, requires_grad=mode == "fwd_bwd")
    rm, rv = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)
    benchmark.group = f"bn_stat {mode} {'x'.join(map(str, shape))} fp32 {device.type}"
    n = x.numel() * x.element_size()
    timed(benchmark, step(fn, (x, rm, rv), mode == "fwd_bwd"), device, bytes_moved=(3 if mode == "fwd_bwd" else 1) * n,
          provider=provider, baseline="eager")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bn_stat_loss_resnet50_forward(benchmark, device, request, provider):
    """Every BN layer of one ResNet-50 forward at 224 px: the BN-prior term of a generator step."""
    torchvision = pytest.importorskip("torchvision")
    from conftest import timed

    fn = loss_fn("bn", provider, device, request)
    batch = max(1, 64 // SCALE)
    model = torchvision.models.resnet50().to(device).eval()
    inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.append((a[0].detach(), m.running_mean, m.running_var)))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224, device=device))
    for h in hooks:
        h.remove()
    acts = [x.requires_grad_() for x, _, _ in inputs]
    rms, rvs = [rm for _, rm, _ in inputs], [rv for _, _, rv in inputs]

    def run():
        if provider.startswith("madfast_"):  # every layer in one call, as BNStatHook does
            bn_stat_losses(acts, rms, rvs, backend=provider.removeprefix("madfast_")).backward()
        else:
            sum(fn(x, rm, rv) for x, rm, rv in zip(acts, rms, rvs)).backward()

    benchmark.group = f"bn_stat fwd_bwd resnet50 224px batch {batch} ({len(acts)} layers) fp32 {device.type}"
    timed(benchmark, run, device, bytes_moved=3 * sum(x.numel() * x.element_size() for x in acts),
          provider=provider, baseline="eager")


@pytest.mark.parametrize("provider", ["eager", "madfast_cpp", "madfast_cuda", "madfast_triton"])
def test_bn_hook_host_time(benchmark, device, request, provider):
    """Host time of a BN prior over 53 BN layers of 2×4×2×2 inputs (kernels cost nothing): a teacher
    forward with BNStatHook, hook.loss and the backward. Eager: the loss of each layer summed in a
    pre-hook (what the hook did before deferring)."""
    from conftest import madfast_backend, timed

    layers = 53
    teacher = torch.nn.Sequential(*[torch.nn.BatchNorm2d(4) for _ in range(layers)]).to(device).eval()
    teacher.requires_grad_(False)
    x = torch.randn(2, 4, 2, 2, device=device)
    if provider == "eager":
        losses = []
        for bn in teacher:
            bn.register_forward_pre_hook(lambda m, a: losses.append(eager_bn(a[0], m.running_mean, m.running_var)))

        def run():
            losses.clear()
            out = teacher(x.clone().requires_grad_()).sum() + sum(losses)
            out.backward()
    else:
        from madfast.nn import BNStatHook

        hook = BNStatHook(teacher, backend=madfast_backend(provider, "bn_stat_losses", device, request))

        def run():
            out = teacher(x.clone().requires_grad_()).sum() + hook.loss
            out.backward()

    benchmark.group = f"bn hook host time, {layers} layers of 2x4x2x2 fp32 {device.type}"
    timed(benchmark, run, device, bytes_moved=0, provider=provider, baseline="eager")
