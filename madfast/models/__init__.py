"""Networks: the MAD generator, the CIFAR/demo teachers and students, and a name registry."""

from madfast.models.cifar_resnet import CifarResNet, cifar_resnet18, cifar_resnet34
from madfast.models.generator import CONDITIONINGS, Generator, ResUpsampleBlock
from madfast.models.registry import MODELS, build_model, model_names
from madfast.models.small_cnn import SmallCNN
from madfast.models.wrn import WideResNet, wrn

__all__ = ["Generator", "ResUpsampleBlock", "CONDITIONINGS", "CifarResNet", "cifar_resnet18", "cifar_resnet34",
           "WideResNet", "wrn", "SmallCNN", "build_model", "model_names", "MODELS"]
