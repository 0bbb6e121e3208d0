"""UpsampleConvBlock: the generator's bilinear ×2 upsample → conv3×3 → BN → LeakyReLU block."""

from __future__ import annotations

import torch
from torch import nn

from madfast import _backend
from madfast.nn.fused_block import upsample_conv_bn_lrelu

__all__ = ["UpsampleConvBlock"]


class UpsampleConvBlock(nn.Sequential):
    """``nn.Sequential(UpsamplingBilinear2d(2), Conv2d(in, out, 3, 1, 1), BatchNorm2d(out), LeakyReLU)``.

    A Sequential with the same children, so its state_dict ("1.weight", "2.running_mean", ...)
    loads into that Sequential and back. Without a conv bias, ``backend`` "triton" or "aten" (or
    MADFAST_BACKEND) runs the fused path (madfast.nn.fused_block) with the same train/eval
    semantics: "triton" never stores the up-sampled tensor, "aten" (ATen's convolution, output
    channels_last) does not keep it for backward. "auto" takes a fused path on a GPU only where
    `madfast check` verified it (madfast._backend.OPS["upsample_block"]), else the torch reference.
    """

    def __init__(self, in_channels: int, out_channels: int, scale_factor: int = 2, bias: bool = False,
                 negative_slope: float = 0.2, backend: str = "auto"):
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UpsampleConvBlock: {name} must be a positive int, got {value!r}")
        if scale_factor != 2:
            raise ValueError(f"UpsampleConvBlock: scale_factor must be 2 (the paper's ×2 bilinear block), "
                             f"got {scale_factor!r}")
        if backend not in _backend.BACKENDS:
            raise ValueError(f"UpsampleConvBlock: backend must be one of {_backend.BACKENDS}, got {backend!r}")
        super().__init__(
            nn.UpsamplingBilinear2d(scale_factor=2),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=bias),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(negative_slope),
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.scale_factor, self.negative_slope, self.backend = scale_factor, negative_slope, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"UpsampleConvBlock: x must be a 4-D (N, C, H, W) tensor, "
                             f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"UpsampleConvBlock: x has {x.shape[1]} channels, the block expects "
                             f"in_channels={self.in_channels}")
        chosen = _backend.choose("upsample_block", self.backend, x.device, x.dtype)
        if chosen != "torch" and self[1].bias is None:
            return upsample_conv_bn_lrelu(x, self[1], self[2], self.negative_slope, chosen)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
