"""UpsampleConvBlock's fused path against the nn.Sequential it replaces: outputs, every gradient,
running statistics, train and eval mode, state_dict both ways; a whole Generator on it."""

import copy

import pytest
import torch
from torch import nn

from conftest import COMPILED_BACKENDS, DEVICES, assert_within, skip_unless_available
from madfast.models import Generator
from madfast.nn import UpsampleConvBlock

SIZES = [(1, 3, 3, 1), (33, 3, 17, 4), (2, 17, 64, 7), (1, 64, 3, 8), (33, 17, 3, 1), (2, 128, 128, 4)]  # N, Cin, Cout, H=W


def sequential(cin, cout, slope=0.2):
    return nn.Sequential(nn.UpsamplingBilinear2d(scale_factor=2), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(slope))


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


FUSED = COMPILED_BACKENDS + [(d, "aten") for d in DEVICES]  # "aten": fused around ATen's convolution


@pytest.mark.parametrize("device,backend", FUSED)
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


@pytest.mark.parametrize("device,backend", FUSED)
def test_fused_block_under_bf16_autocast(device, backend):
    """As nn.Conv2d under autocast: the convolution in bf16 from fp32 weights (custom ops are not
    cast by autocast), the output in bf16, fp32 gradients for the fp32 parameters."""
    skip_unless_available("upsample_conv", backend, device)
    torch.manual_seed(0)
    block = UpsampleConvBlock(5, 6, backend=backend).to(device)
    ref = sequential(5, 6).to(device).double()
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in block.state_dict().items()})
    x = torch.randn(3, 5, 7, 7, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    expected = ref(x.double())
    expected.square().sum().backward()
    # bf16 rounding of x, the weight and the conv output (8 bits each) on a unit-variance output
    torch.testing.assert_close(out.double(), expected, atol=4e-2, rtol=4e-2)
    grad, ref_grad = block[1].weight.grad, ref[1].weight.grad
    assert grad.dtype == torch.float32
    assert (grad.double() - ref_grad).norm() <= 5e-2 * ref_grad.norm()


@pytest.mark.parametrize("device,backend", FUSED)
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


# ---- backend "aten": against the nn.Sequential run in fp64 ----

ATEN_SIZES = [(1, 3, 3, 1, 1), (33, 3, 17, 4, 4), (2, 17, 64, 7, 5), (1, 64, 3, 8, 8), (3, 5, 7, 1, 9),
              (2, 128, 128, 4, 4)]  # N, Cin, Cout, H, W: batch 1, 1×1 inputs, odd and non-square shapes
FACTORS = {"out": 2, "grad": 3}


def _run(module, x, g):
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(g.to(out.dtype))
    return {"out": out.detach(), "grad x": x.grad,
            **{f"grad {n}": p.grad for n, p in module.named_parameters()},
            **{n: b.clone() for n, b in module.named_buffers()}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("size", ATEN_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device", DEVICES)
def test_aten_block_matches_sequential_in_fp64(device, size, layout, dtype):
    """Outputs, the gradients of x and of every parameter, and the running statistics (two train
    steps, then eval) within flash-attention's rule: at most 2× (3× for gradients) the error of the
    nn.Sequential itself run in ``dtype``, both measured against that Sequential in fp64."""
    N, cin, cout, h, w = size
    # In bf16/fp16 an ulp of z = BN(y) flips LeakyReLU's branch at a few random points, for torch and
    # us alike, and each flip moves a gradient by (1 − slope)·|grad|: there slope 1 tests the
    # rest exactly; fp32 (flips ~never) tests the kink.
    slope = 0.2 if dtype == torch.float32 else 1.0
    torch.manual_seed(0)
    ref = sequential(cin, cout, slope).double().to(device)
    with torch.no_grad():
        ref[2].weight.uniform_(0.5, 1.5)
        ref[2].bias.uniform_(-0.5, 0.5)
    same = copy.deepcopy(ref).to(dtype)
    block = UpsampleConvBlock(cin, cout, negative_slope=slope, backend="aten").to(device, dtype)
    block.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    for training in (True, True, False):
        for m in (ref, same, block):
            m.train(training)
            m.zero_grad()
        x = torch.randn(N, cin, h, w, generator=g, dtype=torch.float64).to(device)
        grad = torch.randn(N, cout, 2 * h, 2 * w, generator=g, dtype=torch.float64).to(device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        expected, torch_low = _run(ref, x, grad), _run(same, x.to(dtype), grad)
        ours = _run(block, x.to(dtype), grad)
        assert ours["out"].dtype == dtype
        for what, value in ours.items():
            if what == "2.num_batches_tracked":
                assert torch.equal(value, expected[what])
                continue
            factor = FACTORS["grad" if what.startswith("grad") else "out"]
            assert_within(value, expected[what], torch_low[what], dtype, factor, f"{what} (train={training})")


@pytest.mark.parametrize("device", DEVICES)
def test_aten_block_saves_no_upsampled_tensor(device):
    """What autograd keeps between forward and backward (counted by saved_tensors_hooks, each
    storage once): eager keeps the 4× up-sampled input, the conv output and the BN output; the aten
    path keeps x and the conv output only."""
    N, cin, cout, hw = 8, 32, 16, 8
    ref = sequential(cin, cout).to(device)
    block = UpsampleConvBlock(cin, cout, backend="aten").to(device)
    block.load_state_dict(ref.state_dict())
    x = torch.randn(N, cin, hw, hw, device=device, requires_grad=True)

    def saved_bytes(module):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(x)
        out.sum().backward()
        return sum(storages.values())

    x_bytes, y_bytes, w_bytes = x.numel() * 4, N * cout * 4 * hw * hw * 4, cout * cin * 9 * 4
    eager, aten = saved_bytes(ref), saved_bytes(block)
    assert eager >= 4 * x_bytes + 2 * y_bytes + w_bytes  # up-sampled input, conv output, BN output, weight
    assert aten <= x_bytes + y_bytes + w_bytes + 1024  # x, y, the weight and (C,) vectors
    assert aten < eager / 2


@pytest.mark.parametrize("device", DEVICES)
def test_aten_block_compiles_fullgraph_in_train_and_eval(device):
    torch.manual_seed(0)
    block = UpsampleConvBlock(5, 6, backend="aten").to(device)
    twin = copy.deepcopy(block)
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        block.train(training), twin.train(training)
        x = torch.randn(3, 5, 4, 7, device=device)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = block(xa), compiled(xb)
        g = torch.randn_like(out_a)
        out_a.backward(g), out_b.backward(g)
        torch.testing.assert_close(out_b, out_a)
        torch.testing.assert_close(xb.grad, xa.grad)
        for (name, p), q in zip(block.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
        for (name, b), c in zip(block.named_buffers(), twin.buffers()):
            torch.testing.assert_close(c, b, msg=name)
