"""Generator block (upsample×2 → conv3×3 → BN → LeakyReLU) and whole generators: eager
nn.Sequential (the baseline), torch.compile of it, and madfast's fused paths (fused around ATen's
convolution — cuDNN / oneDNN —, and Triton); forward and forward+backward, fp32 and bf16, with
peak memory. Shapes: BLOCKS and GENERATORS.
MADFAST_BENCH_SCALE shrinks the batch (CPU runs); the group name gives the shapes run.
"""

from __future__ import annotations

import os

import pytest
import torch

from madfast.models import Generator
from madfast.nn import UpsampleConvBlock

SCALE = int(os.environ.get("MADFAST_BENCH_SCALE", "1"))
PROVIDERS = ["eager", "compiled", "madfast_aten", "madfast_triton"]
# (N, Cin, Cout, H): the generator block's headline shapes (32-px generator at batch 32 and 256, a 112-px block
# of the 224-px generator), and the 224-px generator's first block
BLOCKS = [(32, 128, 128, 8), (32, 128, 64, 16), (256, 128, 128, 8), (64, 64, 64, 56), (64, 128, 128, 7)]
GENERATORS = [(256, 32), (64, 224)]  # (batch, img_size)


def build(provider: str, backend: str, module_fn, device: torch.device):
    """module_fn(backend) on device in train mode, compiled for the "compiled" provider."""
    module = module_fn(backend).to(device).train()
    return torch.compile(module) if provider == "compiled" else module


def run_step(module, inputs, backward: bool):
    def run():
        out = module(*inputs)
        if backward:
            out.float().square().mean().backward()
    return run


def peak_memory(device: torch.device, fn) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", BLOCKS, ids=lambda s: "x".join(map(str, s)))
def test_block(benchmark, device, request, shape, dtype, mode, provider):
    from conftest import madfast_backend, timed

    n, cin, cout, hw = shape
    n = max(1, n // SCALE)
    backend = madfast_backend(provider, "upsample_block", device, request)
    block = build(provider, backend, lambda b: UpsampleConvBlock(cin, cout, backend=b).to(dtype=dtype), device)
    x = torch.randn(n, cin, hw, hw, device=device, dtype=dtype, requires_grad=mode == "fwd_bwd")
    fn = run_step(block, (x,), mode == "fwd_bwd")
    benchmark.group = f"block {mode} {n}x{cin}->{cout} {hw}->{2 * hw}px {str(dtype)[6:]} {device.type}"
    bytes_moved = (x.numel() + n * cout * 4 * hw * hw) * x.element_size() * (3 if mode == "fwd_bwd" else 1)
    timed(benchmark, fn, device, bytes_moved=bytes_moved, provider=provider, baseline="eager")
    benchmark.extra_info["peak_bytes"] = peak_memory(device, fn)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("config", GENERATORS, ids=lambda c: f"b{c[0]}_{c[1]}px")
def test_generator(benchmark, device, request, monkeypatch, config, mode, provider):
    from conftest import madfast_backend, timed

    batch, img = config
    batch = max(1, batch // SCALE)
    backend = madfast_backend(provider, "upsample_block", device, request)
    # The Generator's blocks use backend "auto"; MADFAST_BACKEND picks the path for this run.
    monkeypatch.setenv("MADFAST_BACKEND", backend)
    gen = build(provider, backend, lambda _: Generator(nz=256, num_classes=10, img_size=img), device)
    z = torch.randn(batch, 256, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    fn = run_step(gen, (z, y), mode == "fwd_bwd")
    benchmark.group = f"generator {mode} batch {batch} {img}px fp32 {device.type}"
    timed(benchmark, fn, device, bytes_moved=batch * 3 * img * img * 4, provider=provider, baseline="eager")
    benchmark.extra_info["peak_bytes"] = peak_memory(device, fn)
