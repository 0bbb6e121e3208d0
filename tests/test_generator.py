"""UpsampleConvBlock and Generator: shapes, determinism, conditioning, state_dict compatibility."""

import pytest
import torch
from torch import nn

from madfast.models import Generator
from madfast.nn import UpsampleConvBlock


def reference_block(cin, cout, bias=False, slope=0.2):
    return nn.Sequential(nn.UpsamplingBilinear2d(scale_factor=2), nn.Conv2d(cin, cout, 3, 1, 1, bias=bias),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(slope))


def block_formula(block, x, train, slope=0.1, eps=1e-5, momentum=0.1):
    """The block written out in fp64 (independent of nn.Sequential and of madfast): ×2 bilinear
    (align_corners=True), conv3×3, BatchNorm with the batch's biased variance in train mode (the
    running variance updated with the unbiased one) or the running statistics in eval, LeakyReLU."""
    conv, bn = block[1], block[2]
    up = nn.functional.interpolate(x.double(), scale_factor=2, mode="bilinear", align_corners=True)
    b = None if conv.bias is None else conv.bias.double()
    y = nn.functional.conv2d(up, conv.weight.double(), b, padding=1)
    if train:
        mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
        n = y.numel() / y.shape[1]
        m = momentum
        run_mean = (1 - m) * bn.running_mean.double() + m * mean
        run_var = (1 - m) * bn.running_var.double() + m * var * n / (n - 1)
    else:
        mean, var, run_mean, run_var = bn.running_mean.double(), bn.running_var.double(), None, None
    z = (y - mean[:, None, None]) / torch.sqrt(var[:, None, None] + eps)
    z = z * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
    return torch.where(z >= 0, z, slope * z), run_mean, run_var


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_block_matches_formula_and_state_dict_round_trips(bias, train):
    torch.manual_seed(0)
    block = UpsampleConvBlock(5, 7, bias=bias, negative_slope=0.1)
    with torch.no_grad():  # non-trivial statistics and affine terms
        block[2].running_mean.uniform_(-1, 1)
        block[2].running_var.uniform_(0.5, 2)
        block[2].weight.uniform_(0.5, 1.5)
        block[2].bias.uniform_(-0.5, 0.5)
    ref = reference_block(5, 7, bias=bias, slope=0.1)
    ref.load_state_dict(block.state_dict())
    assert list(block.state_dict()) == list(ref.state_dict())  # a drop-in for the nn.Sequential
    block.train(train)
    x = torch.randn(3, 5, 4, 6)
    expected, run_mean, run_var = block_formula(block, x, train)
    torch.testing.assert_close(block(x).double(), expected, rtol=1e-5, atol=1e-5)
    if train:
        torch.testing.assert_close(block[2].running_mean.double(), run_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(block[2].running_var.double(), run_var, rtol=1e-6, atol=1e-6)
    back = UpsampleConvBlock(5, 7, bias=bias, negative_slope=0.1)
    back.load_state_dict(ref.state_dict())


def test_block_errors():
    block = UpsampleConvBlock(4, 8)
    with pytest.raises(ValueError, match="channels"):
        block(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="scale_factor"):
        UpsampleConvBlock(4, 8, scale_factor=3)
    with pytest.raises(ValueError, match="in_channels"):
        UpsampleConvBlock(0, 8)


CONFIGS = [dict(img_size=s, conditioning=c, block=b, output=o)
           for s in (16, 32) for c in ("sum", "cat", "uncond") for b in ("conv", "resnet") for o in ("tanh", "sigmoid")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_generator_builds_with_output_shape_and_range(cfg):
    g = Generator(nz=8, num_classes=5, channels=3, ngf=4, **cfg)
    x, y = g.sample(6)
    assert x.shape == (6, 3, cfg["img_size"], cfg["img_size"]) and y.shape == (6,)
    lo = -1 if cfg["output"] == "tanh" else 0
    assert x.min() >= lo and x.max() <= 1


@pytest.mark.parametrize("size,blocks", [(16, 2), (32, 2), (64, 3), (128, 4), (224, 5)])
def test_generator_sizes(size, blocks):
    g = Generator(nz=8, ngf=2, img_size=size)
    assert len(g.blocks) == blocks
    assert g.sample(2)[0].shape[-1] == size


def test_generator_is_deterministic_under_a_seed():
    torch.manual_seed(1)
    g = Generator(nz=8, ngf=4, img_size=16).eval()
    a = g.sample(4, generator=torch.Generator().manual_seed(3))
    b = g.sample(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("conditioning", ["sum", "cat", "uncond"])
def test_conditioning_depends_on_labels(conditioning):
    g = Generator(nz=8, ngf=4, img_size=16, conditioning=conditioning).eval()
    z = torch.randn(4, 8)
    a, b = g(z, torch.zeros(4, dtype=torch.long)), g(z, torch.full((4,), 3))
    assert torch.equal(a, b) == (conditioning == "uncond")


def test_generator_errors():
    with pytest.raises(ValueError, match="img_size"):
        Generator(img_size=48)
    with pytest.raises(ValueError, match="conditioning"):
        Generator(conditioning="film")
    g = Generator(nz=8, ngf=4, img_size=16)
    with pytest.raises(ValueError, match="needs labels"):
        g(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"z must be \(N, 8\)"):
        g(torch.randn(2, 9), torch.zeros(2, dtype=torch.long))
