"""The MAD trainer: configuration, the MAD task (generator, EMA and student steps), the loop,
checkpoints and torchrun support."""

from madfast.train.config import DistillConfig, TeacherConfig, config_from_dict
from madfast.train.loop import NonFiniteLossError, distill, train_teacher
from madfast.train.task import MADTask

__all__ = ["DistillConfig", "TeacherConfig", "config_from_dict", "MADTask", "distill", "train_teacher",
           "NonFiniteLossError"]
