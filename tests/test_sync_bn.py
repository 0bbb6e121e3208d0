"""--sync-bn's teacher prior on 2 gloo processes: the value of one process on the whole batch
(fp64 formula here), and each rank's input gradient world × the global loss's (DDP then averages)."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from madfast.models.small_cnn import SmallCNN

WORLD, N = 2, 6


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    t = SmallCNN(10, 1, width=4).eval()
    g = torch.Generator().manual_seed(1)
    for bn in (m for m in t.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return t


def _batch() -> torch.Tensor:
    x = torch.randn(N, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    return x + 2.0 * (torch.arange(N) % WORLD).view(N, 1, 1, 1)  # rank 1's share is brighter: shares differ


def _worker(rank: int, store: str, out: str) -> None:
    from madfast.train.sync_bn import GlobalBNStatHook

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        teacher = _teacher()
        hook = GlobalBNStatHook(teacher, backend="torch")
        x = _batch()[rank::WORLD].clone().requires_grad_(True)  # this rank's share
        teacher(x)
        hook.loss.backward()
        torch.save({"loss": hook.loss.detach(), "grad": x.grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _global_prior(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Σ over BN layers of ‖μ − running_mean‖₂ + ‖σ²(biased) − running_var‖₂ of the whole batch, fp64."""
    teacher = teacher.double()
    terms = []
    hooks = [bn.register_forward_pre_hook(lambda m, a: terms.append(
        (a[0].mean((0, 2, 3)) - m.running_mean).norm() + (a[0].var((0, 2, 3), unbiased=False) - m.running_var).norm()))
        for bn in teacher.modules() if isinstance(bn, nn.BatchNorm2d)]
    teacher(x)
    for h in hooks:
        h.remove()
    return torch.stack(terms).sum()


@pytest.mark.slow
def test_global_bn_prior_on_two_processes(tmp_path):
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD, join=True)
    x = _batch().double().requires_grad_(True)
    want = _global_prior(_teacher(), x)
    want.backward()
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        assert got["loss"].item() == pytest.approx(want.item(), rel=1e-5)
        torch.testing.assert_close(got["grad"].double(), WORLD * x.grad[rank::WORLD], rtol=1e-4, atol=1e-7)
    # a per-rank prior (the bug this fixes) is a different number
    local = _global_prior(_teacher(), _batch().double()[0::WORLD]).item()
    assert abs(local - want.item()) > 0.05 * want.item()


def test_global_prior_keeps_precision_when_mean_dwarfs_std(tmp_path):
    """fp32 activations at 1000 ± 0.1 with running statistics near them: the moments are summed
    around the running mean, so the variance is not lost to E[x²] − E[x]² cancellation (~0.06
    error in fp32 summing raw x, against a variance of 0.01)."""
    from madfast.train.sync_bn import GlobalBNStatHook

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        bn = nn.BatchNorm2d(3).eval()
        bn.running_mean.fill_(1000.0)
        bn.running_var.fill_(0.02)
        model = nn.Sequential(bn)
        hook = GlobalBNStatHook(model, backend="torch")
        x = 1000.0 + 0.1 * torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        model(x)
        got = hook.loss.item()
    finally:
        dist.destroy_process_group()
    x64 = x.double()
    want = ((x64.mean((0, 2, 3)) - 1000.0).norm() + (x64.var((0, 2, 3), unbiased=False) - 0.02).norm()).item()
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
