"""The bounded adversarial loss of the generator step."""

from madfast.ops.adversarial_loss.op import adversarial_loss
from madfast.ops.adversarial_loss.reference import torch_adversarial_loss

__all__ = ["adversarial_loss", "torch_adversarial_loss"]
