"""The generator block's tail, fused: out = LeakyReLU(y·scale_c + shift_c), and in the backward,
grad_y = grad·LeakyReLU'(z)·scale_c with the per-channel sums Σ grad·LeakyReLU'(z)·y and
Σ grad·LeakyReLU'(z) (the gradients of scale and shift) taken in the same pass.

scale and shift fold BatchNorm (``fold_bn``), so autograd carries their gradients on to γ, β and
the batch statistics. Kernels: csrc/bn_lrelu.cpp (CPU), csrc/cuda/bn_lrelu.cuh, triton_kernel.py.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from madfast import _backend
from madfast.ops._checks import check_floating, check_same
from madfast.ops._dtypes import acc_dtype
from madfast.ops._layout import kernel_memory_format
from madfast.ops._register import register

__all__ = ["bn_lrelu", "fold_bn"]


def fold_bn(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm as a per-channel affine map, in fp32: (1/√(var + ε), scale = γ/√(var + ε),
    shift = β − mean·scale); γ = 1 and β = 0 when absent."""
    invstd = torch.rsqrt(var.float() + eps)
    scale = invstd * weight.float() if weight is not None else invstd
    shift = -mean.float() * scale
    return invstd, scale, (shift + bias.float() if bias is not None else shift)


def _like(y):
    """The kernels' output layout: y's when contiguous or channels_last, else contiguous."""
    return torch.empty_like(y, memory_format=kernel_memory_format(y))


def _check_scale_shift(op: str, y, scale, shift) -> None:
    """csrc/bn_lrelu.h's checks of scale and shift, in the fakes: a meta tensor beside real ones
    sends the dispatcher there, which must not hand back an uninitialised y."""
    check_floating(op, "y", y, ndim=4)
    for name, t in (("scale", scale), ("shift", shift)):
        if tuple(t.shape) != (y.shape[1],):
            raise ValueError(f"{op}: {name} must have shape ({y.shape[1]},), got {list(t.shape)}")
        check_same(op, name, t, "y", y, shape=False, dtype=False)


def _fake_fwd(y, scale, shift, negative_slope):
    _check_scale_shift("bn_lrelu", y, scale, shift)
    return _like(y)


def _fake_bwd(grad, y, scale, shift, negative_slope):  # the (C,) gradients in the accumulation dtype
    _check_scale_shift("bn_lrelu_backward", y, scale, shift)
    check_same("bn_lrelu_backward", "grad", grad, "y", y)
    acc = acc_dtype(y.dtype)
    return _like(y), scale.new_empty(scale.shape, dtype=acc), shift.new_empty(shift.shape, dtype=acc)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2])
    ctx.negative_slope = inputs[3]


def _backward(backward_op, ctx, grad):
    y, scale, shift = ctx.saved_tensors
    g_y, g_scale, g_shift = backward_op(grad, y, scale, shift, ctx.negative_slope)
    return g_y, g_scale.to(scale.dtype), g_shift.to(shift.dtype), None


if importlib.util.find_spec("triton") is not None:
    from madfast.ops.bn_lrelu.triton_kernel import triton_bn_lrelu

    @torch.library.custom_op("madfast::bn_lrelu_triton", mutates_args=())
    def _bn_lrelu_triton(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                         negative_slope: float) -> torch.Tensor:
        return triton_bn_lrelu(y, scale, shift, negative_slope)[0]

    @torch.library.custom_op("madfast::bn_lrelu_backward_triton", mutates_args=())
    def _bn_lrelu_backward_triton(grad: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                                  negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_bn_lrelu(y, scale, shift, negative_slope, grad)


register("bn_lrelu", fake=_fake_fwd, backward_fake=_fake_bwd, setup_context=_setup, backward=_backward)


def bn_lrelu(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, negative_slope: float,
             backend: str) -> torch.Tensor:
    """LeakyReLU(y·scale_c + shift_c) for y (N, C, H, W) and (C,) scale/shift, in y's dtype, on a
    backend already chosen (madfast._backend.choose("bn_lrelu", ...))."""
    if backend != "torch":
        return _backend.compiled_op("bn_lrelu", backend)(y, scale, shift, float(negative_slope))
    acc = acc_dtype(y.dtype)
    z = y.to(acc) * scale.to(acc).view(1, -1, 1, 1) + shift.to(acc).view(1, -1, 1, 1)
    return F.leaky_relu(z, negative_slope).to(y.dtype)
