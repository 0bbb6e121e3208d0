"""The class-conditional generator of MAD: linear → BN → bilinear up-blocks → conv → tanh/sigmoid."""

from __future__ import annotations

import torch
from torch import nn

from madfast import _backend
from madfast.nn import UpsampleConvBlock

__all__ = ["Generator", "ResUpsampleBlock", "CONDITIONINGS"]

CONDITIONINGS = ("sum", "cat", "uncond")
BLOCKS = ("conv", "resnet")
OUTPUTS = ("tanh", "sigmoid")


class ResUpsampleBlock(nn.Module):
    """The paper's "ResNetBlock": an UpsampleConvBlock plus a bilinear-upsampled shortcut
    (a 1×1 conv when the channel count changes)."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float = 0.2, backend: str = "auto"):
        super().__init__()
        self.body = UpsampleConvBlock(in_channels, out_channels, negative_slope=negative_slope, backend=backend)
        self.up = nn.UpsamplingBilinear2d(scale_factor=2)
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(self.up(x))


def _first_side(img_size) -> int | None:
    """Side of the first feature map: 4 for 16 px, 8 for 8·2^k px, 7 for 7·2^k px (224); else None."""
    for start in (4, 8, 7):
        n = img_size // start if isinstance(img_size, int) else 0
        if n >= 4 and img_size % start == 0 and n & (n - 1) == 0 and (start != 4 or img_size == 16):
            return start
    return None


def generator_img_size_error(img_size) -> str | None:
    """None if a Generator can make ``img_size``-pixel images, else what the size must be."""
    if _first_side(img_size) is not None:
        return None
    return f"must be 16, 8·2^k (32, 64, 128, ...) or 7·2^k (224, ...), got {img_size!r}"


class Generator(nn.Module):
    """G(z, y). Conditioning (the paper's): "sum" G(z + E[y]), "cat" G([z, E[y]]), "uncond" G(z).

    Widths [ours, the common DFKD generator]: linear → 2·ngf × s0 × s0 → BN → up-blocks
    (2·ngf wide, the last one ngf) → conv3×3 → ``output`` activation, with s0 = 8 (4 for 16 px,
    7 for 224 px): 2 blocks at 16 and 32 px, 3 at 64, 4 at 128, 5 at 224. Images come out in
    [-1, 1] (tanh) or [0, 1] (sigmoid).
    """

    def __init__(self, nz: int = 256, num_classes: int = 10, img_size: int = 32, channels: int = 3, ngf: int = 64,
                 conditioning: str = "sum", block: str = "conv", output: str = "tanh", backend: str = "auto"):
        super().__init__()
        for name, value, choices in (("conditioning", conditioning, CONDITIONINGS), ("block", block, BLOCKS),
                                     ("output", output, OUTPUTS)):
            if value not in choices:
                raise ValueError(f"Generator: {name} must be one of {choices}, got {value!r}")
        for name, value in (("nz", nz), ("num_classes", num_classes), ("channels", channels), ("ngf", ngf)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Generator: {name} must be a positive int, got {value!r}")
        self.nz, self.num_classes, self.img_size, self.channels = nz, num_classes, img_size, channels
        self.conditioning = conditioning
        self.start = _first_side(img_size)
        if self.start is None:
            raise ValueError(f"Generator: img_size {generator_img_size_error(img_size)}")
        n_blocks = (img_size // self.start).bit_length() - 1
        # "uncond" has no table: an unused parameter would trip DistributedDataParallel.
        self.embed = nn.Embedding(num_classes, nz) if conditioning != "uncond" else None
        in_dim = 2 * nz if conditioning == "cat" else nz
        self.fc = nn.Linear(in_dim, 2 * ngf * self.start**2)
        self.bn = nn.BatchNorm2d(2 * ngf)
        widths = [2 * ngf] * n_blocks + [ngf]
        make = UpsampleConvBlock if block == "conv" else ResUpsampleBlock
        # backend is the whole model's preference: the blocks take it where upsample_block has it
        block_backend = _backend.preferred("upsample_block", backend)
        self.blocks = nn.Sequential(*(make(widths[i], widths[i + 1], backend=block_backend) for i in range(n_blocks)))
        self.head = nn.Conv2d(ngf, channels, 3, 1, 1)
        self.out = nn.Tanh() if output == "tanh" else nn.Sigmoid()

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ValueError(f"Generator: z must be (N, {self.nz}), got {tuple(z.shape)}")
        if self.embed is not None:
            if y is None:
                raise ValueError(f"Generator: conditioning={self.conditioning!r} needs labels y")
            e = self.embed(y)
            z = z + e if self.conditioning == "sum" else torch.cat([z, e], dim=1)
        h = self.fc(z).view(z.shape[0], -1, self.start, self.start)
        return self.out(self.head(self.blocks(self.bn(h))))

    def sample(self, n: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n images from z ~ N(0, I) and uniform labels: (images, labels)."""
        device = device if device is not None else self.fc.weight.device
        z = torch.randn(n, self.nz, device=device, generator=generator)
        y = torch.randint(0, self.num_classes, (n,), device=device, generator=generator)
        return self(z, y), y
