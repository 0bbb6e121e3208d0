"""What madfast::bn_stat_losses checks of its layers (csrc/channel_moments.h), in Python: for the
Triton op, which validates on first sight of a shape set, and for the fake kernel, which the
dispatcher also runs when one argument is a meta tensor beside real ones (without the checks it
would hand back uninitialised values)."""

from __future__ import annotations

import torch

from madfast.ops._layout import kernel_memory_format

__all__ = ["check_lengths", "layers_key", "layer_key", "check_layers"]


def check_lengths(xs, rms, rvs, op: str) -> None:
    if not xs:
        raise ValueError(f"{op}: x must hold at least one tensor")
    if not len(rms) == len(rvs) == len(xs):
        raise ValueError(f"{op}: x has {len(xs)} tensors but running_mean has {len(rms)} and running_var {len(rvs)}")


def layers_key(xs, rms, rvs, op: str) -> tuple:
    """Per layer: (dtype, shape, device, channels_last, ((dtype, shape, device) of running_mean and of
    running_var)) — all the checks and a plan depend on; the list lengths checked."""
    check_lengths(xs, rms, rvs, op)
    return tuple(layer_key(x, ((m.dtype, m.shape, m.device), (v.dtype, v.shape, v.device)))
                 for x, m, v in zip(xs, rms, rvs))


def layer_key(x: torch.Tensor, stats: tuple) -> tuple:
    """One layer's entry of layers_key, with its running statistics' (dtype, shape, device) pair."""
    return x.dtype, x.shape, x.device, kernel_memory_format(x) == torch.channels_last, stats


def check_layers(key: tuple, op: str) -> None:
    """madfast::bn_stat_losses's checks (csrc/channel_moments.h), with its messages, on what a plan
    key records of each layer."""
    device0 = key[0][2]
    for i, (dtype, shape, device, _, stats) in enumerate(key):
        name = f"x[{i}]"
        if not dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be floating, got {dtype}")
        if len(shape) != 4:
            raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got shape {list(shape)}")
        for what, (s_dtype, s_shape, s_device) in zip(("running_mean", "running_var"), stats):
            if not s_dtype.is_floating_point:
                raise TypeError(f"{op}: {what}[{i}] must be floating, got {s_dtype}")
            if len(s_shape) != 1 or s_shape[0] != shape[1]:
                raise ValueError(f"{op}: {what}[{i}] has shape {list(s_shape)} but {name} has {shape[1]} channels")
            if s_device != device:
                raise ValueError(f"{op}: {what}[{i}] is on {s_device} but {name} is on {device}")
        if device != device0:
            raise ValueError(f"{op}: every x must be on one device, got {device0} and {device}")
