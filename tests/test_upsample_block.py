"""UpsampleConvBlock's fused path against the nn.Sequential it replaces: outputs, every gradient,
running statistics, train and eval mode, state_dict both ways; a whole Generator on it."""

import copy

import pytest
import torch
from torch import nn

from conftest import COMPILED_BACKENDS, skip_unless_available
from madfast.models import Generator
from madfast.nn import UpsampleConvBlock

SIZES = [(1, 3, 3, 1), (33, 3, 17, 4), (2, 17, 64, 7), (1, 64, 3, 8), (33, 17, 3, 1), (2, 128, 128, 4)]  # N, Cin, Cout, H=W


def sequential(cin, cout):
    return nn.Sequential(nn.UpsamplingBilinear2d(scale_factor=2), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_fused_block_matches_sequential(device, backend, size):
    skip_unless_available("upsample_conv", backend, device)
    N, cin, cout, hw = size
    torch.manual_seed(0)
    ref = sequential(cin, cout).to(device)
    with torch.no_grad():
        ref[2].weight.uniform_(0.5, 1.5)
        ref[2].bias.uniform_(-0.5, 0.5)
    block = UpsampleConvBlock(cin, cout, backend=backend).to(device)
    block.load_state_dict(ref.state_dict())
    for training in (True, True, False):
        ref.train(training)
        block.train(training)
        x = torch.randn(N, cin, hw, hw, device=device)
        xr, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_b = ref(xr), block(xb)
        g = torch.randn_like(out_r)
        out_r.backward(g)
        out_b.backward(g)
        torch.testing.assert_close(out_b, out_r, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(xb.grad, xr.grad, atol=1e-4, rtol=1e-4)
        for (name, p_r), p_b in zip(ref.named_parameters(), block.parameters()):
            torch.testing.assert_close(p_b.grad, p_r.grad, atol=1e-3, rtol=1e-4, msg=name)
        for (name, b_r), b_b in zip(ref.named_buffers(), block.buffers()):
            torch.testing.assert_close(b_b, b_r, atol=1e-5, rtol=1e-5, msg=name)
    back = sequential(cin, cout)
    back.load_state_dict(block.state_dict())  # and back into the Sequential


def test_auto_keeps_reference_and_bias_falls_back(monkeypatch):
    monkeypatch.delenv("MADFAST_BACKEND", raising=False)
    block = UpsampleConvBlock(3, 4, bias=True, backend="triton")
    ref = sequential(3, 4)
    ref[1] = nn.Conv2d(3, 4, 3, 1, 1, bias=True)
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(block(x), ref(x))  # bias=True: the reference path


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_generator_on_the_fused_path_equals_reference(monkeypatch, device, backend):
    skip_unless_available("upsample_conv", backend, device)
    torch.manual_seed(0)
    gen = Generator(nz=16, num_classes=3, img_size=32, ngf=8).to(device)
    fused = copy.deepcopy(gen)
    z, y = torch.randn(4, 16, device=device), torch.tensor([0, 1, 2, 1], device=device)
    monkeypatch.setenv("MADFAST_BACKEND", "torch")
    expected = gen(z, y)
    monkeypatch.setenv("MADFAST_BACKEND", backend)
    torch.testing.assert_close(fused(z, y), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device,backend", COMPILED_BACKENDS)
def test_generator_compiles_fullgraph_on_the_fused_path(monkeypatch, device, backend):
    skip_unless_available("upsample_conv", backend, device)
    monkeypatch.setenv("MADFAST_BACKEND", backend)
    torch._dynamo.reset()
    gen = Generator(nz=16, num_classes=3, img_size=32, ngf=8).to(device).eval()
    z, y = torch.randn(2, 16, device=device), torch.tensor([0, 2], device=device)
    compiled = torch.compile(gen, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z, y), gen(z, y), atol=1e-5, rtol=1e-5)
    # train mode: batch statistics, running-stat updates and the backward through the fused ops
    gen.train()
    twin = copy.deepcopy(gen)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    z = torch.randn(4, 16, device=device, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1], device=device)
    (g_eager,) = torch.autograd.grad(gen(z, y).square().sum(), z)
    (g_compiled,) = torch.autograd.grad(compiled(z, y).square().sum(), z)
    torch.testing.assert_close(g_compiled, g_eager, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(gen.named_buffers(), twin.buffers()):
        torch.testing.assert_close(b, a, msg=name)
