"""The bounded adversarial loss of the generator step."""

from madfast.ops.adversarial.op import adversarial_loss
from madfast.ops.adversarial.reference import torch_adversarial_loss

__all__ = ["adversarial_loss", "torch_adversarial_loss"]
