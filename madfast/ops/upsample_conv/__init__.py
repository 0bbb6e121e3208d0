"""conv3×3 of a bilinear ×2 upsample, the generator block's core."""

from madfast.ops.upsample_conv.op import upsample_conv
from madfast.ops.upsample_conv.reference import torch_upsample_conv

__all__ = ["upsample_conv", "torch_upsample_conv"]
