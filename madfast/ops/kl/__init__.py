"""Temperature-scaled KL divergence with gradients to both inputs."""

from madfast.ops.kl.op import kl_div
from madfast.ops.kl.reference import torch_kl_div

__all__ = ["kl_div", "torch_kl_div"]
