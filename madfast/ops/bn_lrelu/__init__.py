"""bn_lrelu: BatchNorm folded to scale/shift + LeakyReLU in one pass, forward and backward."""

from madfast.ops.bn_lrelu.op import bn_lrelu, fold_bn

__all__ = ["bn_lrelu", "fold_bn"]
