"""EMA update: per-parameter loop (ModelEmaV2), eager foreach (ModelEmaV3, the baseline),
torch.compile'd foreach, and each madfast backend; on ResNet-50's parameter list and on one
flat buffer of the same size. fp32: 12 bytes per parameter (read EMA and param, write EMA)."""

from __future__ import annotations

import pytest
import torch

from madfast.check.cases import RESNET50_PARAMS, resnet50_param_shapes
from madfast.ops import ema_update_

DECAY = 0.999
WORKLOADS = {"resnet50_params": resnet50_param_shapes, "flat_25.6M": lambda: [(RESNET50_PARAMS,)]}
PROVIDERS = ["copy", "loop", "foreach", "compiled_foreach", "madfast_torch", "madfast_cpp", "madfast_triton",
             "madfast_cuda"]


def make_update(provider: str, ema: list[torch.Tensor], cur: list[torch.Tensor]):
    if provider == "copy":  # the bandwidth a kernel that moves 8 of our 12 bytes could reach
        flat_src, flat_dst = torch.cat([c.flatten() for c in cur]), torch.empty(sum(c.numel() for c in cur),
                                                                                 device=cur[0].device)
        return lambda: flat_dst.copy_(flat_src)
    if provider == "loop":
        def loop():
            for e, c in zip(ema, cur):
                e.copy_(DECAY * e + (1.0 - DECAY) * c)
        return loop
    if provider == "foreach":
        return lambda: torch._foreach_lerp_(ema, cur, 1.0 - DECAY)
    if provider == "compiled_foreach":
        compiled = torch.compile(lambda e, c: torch._foreach_lerp_(e, c, 1.0 - DECAY))
        return lambda: compiled(ema, cur)
    backend = provider.removeprefix("madfast_")
    return lambda: ema_update_(ema, cur, DECAY, backend=backend)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_ema_update(benchmark, device, request, workload, provider):
    from conftest import madfast_backend, timed

    madfast_backend(provider, "ema_update_", device, request)  # skips what cannot run here
    shapes = WORKLOADS[workload]()
    g = torch.Generator().manual_seed(0)
    ema = [torch.randn(s, generator=g).to(device) for s in shapes]
    cur = [torch.randn(s, generator=g).to(device) for s in shapes]
    n = sum(e.numel() for e in ema)
    benchmark.group = f"ema {workload} ({len(shapes)} tensors, {n / 1e6:.1f}M fp32) {device.type}"
    timed(benchmark, make_update(provider, ema, cur), device,
          bytes_moved=(8 if provider == "copy" else 12) * n, provider=provider, baseline="foreach")


# Host cost: 4-element tensors, so that only the per-call Python/C++ work counts. The cost per
# additional tensor is (mean at 161 − mean at 1) / 160 (targets: ≤ 0.5 µs FusedEMA.update,
# ≤ 1 µs ema_update_; eager torch._foreach_lerp_ for comparison).
HOST_PROVIDERS = ["foreach", "madfast_ema_update", "madfast_fused_ema"]


class _Params(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.params = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(4)) for _ in range(n)])


@pytest.mark.parametrize("provider", HOST_PROVIDERS)
@pytest.mark.parametrize("n_tensors", [1, 161])
def test_ema_host_cost(benchmark, device, n_tensors, provider):
    from madfast import FusedEMA

    if device.type != "cpu":
        pytest.skip("host cost is measured with CPU tensors (no kernel time to hide it)")
    model = _Params(n_tensors)
    ema_model = FusedEMA(model, decay=DECAY, backend="cpp")
    ema, cur = list(ema_model.module.parameters()), list(model.parameters())
    fn = {"foreach": lambda: torch._foreach_lerp_(ema, cur, 1.0 - DECAY),
          "madfast_ema_update": lambda: ema_update_(ema, cur, DECAY, backend="cpp"),
          "madfast_fused_ema": lambda: ema_model.update(model)}[provider]
    fn = torch.no_grad()(fn)  # a constant per call, the same for every provider
    fn()
    benchmark.group = f"ema host cost, {n_tensors} tensors of 4 fp32 (cpu)"
    benchmark.extra_info.update(provider=provider, baseline="foreach", n_tensors=n_tensors, bytes=12 * 4 * n_tensors)
    benchmark.pedantic(fn, rounds=2000, iterations=5, warmup_rounds=100)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = 12 * 4 * n_tensors / benchmark.stats.stats.mean / 1e9
