"""UpsampleConvBlock's fused path against the nn.Sequential it replaces: outputs, every gradient,
running statistics, train and eval mode, state_dict both ways; a whole Generator on it."""

import copy

import pytest
import torch
from torch import nn

from conftest import skip_unless_available
from madfast.models import Generator
from madfast.nn import UpsampleConvBlock

SIZES = [(1, 3, 3, 1), (33, 3, 17, 4), (2, 17, 64, 7), (1, 64, 3, 8), (33, 17, 3, 1)]  # (N, Cin, Cout, H=W)


def sequential(cin, cout):
    return nn.Sequential(nn.UpsamplingBilinear2d(scale_factor=2), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_fused_block_matches_sequential(size):
    skip_unless_available("upsample_conv", "triton", "cpu")
    N, cin, cout, hw = size
    torch.manual_seed(0)
    ref = sequential(cin, cout)
    with torch.no_grad():
        ref[2].weight.uniform_(0.5, 1.5)
        ref[2].bias.uniform_(-0.5, 0.5)
    block = UpsampleConvBlock(cin, cout, backend="triton")
    block.load_state_dict(ref.state_dict())
    for training in (True, True, False):
        ref.train(training)
        block.train(training)
        x = torch.randn(N, cin, hw, hw)
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


def test_generator_on_the_fused_path_equals_reference(monkeypatch):
    skip_unless_available("upsample_conv", "triton", "cpu")
    torch.manual_seed(0)
    gen = Generator(nz=16, num_classes=3, img_size=32, ngf=8)
    fused = copy.deepcopy(gen)
    z, y = torch.randn(4, 16), torch.tensor([0, 1, 2, 1])
    monkeypatch.setenv("MADFAST_BACKEND", "torch")
    expected = gen(z, y)
    monkeypatch.setenv("MADFAST_BACKEND", "triton")
    torch.testing.assert_close(fused(z, y), expected, atol=1e-4, rtol=1e-4)


def test_generator_compiles_fullgraph_on_the_fused_path(monkeypatch):
    skip_unless_available("upsample_conv", "triton", "cpu")
    monkeypatch.setenv("MADFAST_BACKEND", "triton")
    torch._dynamo.reset()
    gen = Generator(nz=16, num_classes=3, img_size=32, ngf=8).eval()
    z, y = torch.randn(2, 16), torch.tensor([0, 2])
    compiled = torch.compile(gen, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z, y), gen(z, y), atol=1e-5, rtol=1e-5)
