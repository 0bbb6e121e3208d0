"""Backend "aten": conv3×3(bilinear-upsample×2(x)) fused around ATen's own convolution (cuDNN on
CUDA, TF32 for fp32 as torch.backends.cudnn.allow_tf32 says; oneDNN on CPU).

The up-sampled tensor is not saved for backward but recomputed there (eager nn.Sequential keeps it,
4× the input); the batch mean and biased variance come from one Welford pass over y; y is
channels_last whatever x's layout. The backward folds the moments' gradients into grad_y, calls
ATen's convolution_backward and the gather-form bilinear adjoint (no atomics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from madfast import _backend
from madfast.ops._checks import check_devices, check_same
from madfast.ops._dtypes import acc_dtype
from madfast.ops._layout import kernel_memory_format
from madfast.ops.bn_lrelu import bn_lrelu, fold_bn
from madfast.ops.bn_stats.op import channel_moments
from madfast.ops.upsample_conv.bilinear_adjoint import torch_bilinear_adjoint

__all__ = ["bn_lrelu_aten"]

CL = torch.channels_last


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x.contiguous(memory_format=CL), size=(2 * x.shape[2], 2 * x.shape[3]),
                         mode="bilinear", align_corners=True)


def _out_shape(x, weight):
    return (x.shape[0], weight.shape[0], 2 * x.shape[2], 2 * x.shape[3])


@torch.library.custom_op("madfast::upsample_conv_aten", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = F.conv2d(_upsample(x), weight.contiguous(memory_format=CL), padding=1).contiguous(memory_format=CL)
    if not stats:
        empty = x.new_empty(0, dtype=acc_dtype(x.dtype))
        return y, empty, empty.clone()
    mean, var = channel_moments(y)
    return y, mean, var


@_forward.register_fake
def _(x, weight, stats):
    # checked: a meta tensor beside a real one sends the dispatcher to this fake
    check_same("upsample_conv", "weight", weight, "x", x, shape=False)
    y = torch.empty(_out_shape(x, weight), dtype=x.dtype, device=x.device, memory_format=CL)
    width = weight.shape[0] if stats else 0
    acc = acc_dtype(x.dtype)
    return y, x.new_empty(width, dtype=acc), x.new_empty(width, dtype=acc)


def _fold(grad_y, y, mean, grad_mean, grad_var):
    """grad_y + ∂mean/∂y·g_mean + ∂var/∂y·g_var = grad_y + g_mean/M + 2(y − mean)·g_var/M, per channel."""
    if grad_mean is None and grad_var is None:
        return grad_y.contiguous(memory_format=CL)
    acc = acc_dtype(grad_y.dtype)
    count = grad_y.numel() // max(grad_y.shape[1], 1)
    c = (1, -1, 1, 1)
    if grad_var is not None:  # y − mean explicitly: no cancellation when |mean| ≫ std
        g = y.to(acc, memory_format=CL, copy=True).sub_(mean.to(acc).view(c))
        g.mul_((grad_var.to(acc) * (2 / count)).view(c)).add_(grad_y)
    else:
        g = grad_y.to(acc, memory_format=CL, copy=True)
    if grad_mean is not None:
        g.add_((grad_mean.to(acc) / count).view(c))
    return g.to(grad_y.dtype)


def bilinear_adjoint(grad_up: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The gather-form adjoint into a tensor laid out like ``like`` (x)."""
    out = torch.empty_like(like)
    if grad_up.is_cuda and _backend.triton_usable(grad_up.device):
        from madfast.ops.upsample_conv.bilinear_adjoint import triton_bilinear_adjoint

        return triton_bilinear_adjoint(grad_up, like.shape[2], like.shape[3], out=out)
    return out.copy_(torch_bilinear_adjoint(grad_up, like.shape[2], like.shape[3]))


@torch.library.custom_op("madfast::upsample_conv_backward_aten", mutates_args=())
def _backward_op(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor | None,
                 mean: torch.Tensor | None, grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None,
                 grad_input: bool, grad_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if grad_var is not None and (y is None or mean is None):
        raise ValueError("upsample_conv_backward_aten: y and mean (the forward's outputs) must be given with grad_var")
    if tuple(grad_y.shape) != _out_shape(x, weight):
        raise ValueError(f"upsample_conv_backward_aten: grad_y must have shape {_out_shape(x, weight)}, "
                         f"got {tuple(grad_y.shape)}")
    g = _fold(grad_y, y, mean, grad_mean, grad_var)
    # the data gradient needs only the input's shape: an expanded scalar stands in unless grad_weight
    up = _upsample(x) if grad_weight else g.new_empty(1).expand(x.shape[0], x.shape[1], *g.shape[2:])
    g_up, g_w, _ = torch.ops.aten.convolution_backward(
        g, up, weight.contiguous(memory_format=CL), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [grad_input, grad_weight, False])
    del up
    g_x = bilinear_adjoint(g_up, x) if grad_input else x.new_empty(0)
    return g_x, (g_w.contiguous() if grad_weight else weight.new_empty(0))


@_backward_op.register_fake
def _(grad_y, x, weight, y, mean, grad_mean, grad_var, grad_input, grad_weight):
    check_devices("upsample_conv_backward", "x", x, grad_y=grad_y, weight=weight, y=y, mean=mean,
                  grad_mean=grad_mean, grad_var=grad_var)
    return (torch.empty_like(x) if grad_input else x.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_weight else weight.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, stats = inputs
    ctx.stats = stats
    ctx.save_for_backward(x, weight, output[0] if stats else None, output[1] if stats else None)


def _autograd_backward(ctx, g_y, g_mean, g_var):
    x, weight, y, mean = ctx.saved_tensors
    if not ctx.stats:
        g_mean = g_var = None
    if g_y is None:
        g_y = x.new_zeros(_out_shape(x, weight), memory_format=CL)
    g_x, g_w = torch.ops.madfast.upsample_conv_backward_aten(
        g_y, x, weight, y if g_var is not None else None, mean if g_var is not None else None, g_mean, g_var,
        *ctx.needs_input_grad[:2])
    return (g_x if ctx.needs_input_grad[0] else None), (g_w if ctx.needs_input_grad[1] else None), None


_forward.register_autograd(_autograd_backward, setup_context=_setup)


# ---- the block's tail on this path: BatchNorm (batch or running statistics) + LeakyReLU ----

@torch.library.custom_op("madfast::bn_lrelu_aten", mutates_args=())
def _bn_lrelu(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
              bias: torch.Tensor | None, eps: float, negative_slope: float, batch_stats: bool) -> torch.Tensor:
    _, scale, shift = fold_bn(mean, var, weight, bias, eps)
    # the forward only: this op's backward is the formula below, so no atomics run
    return bn_lrelu(y, scale, shift, negative_slope, _backend.choose("bn_lrelu", "auto", y.device, y.dtype))


@_bn_lrelu.register_fake
def _(y, mean, var, weight, bias, eps, negative_slope, batch_stats):
    check_devices("bn_lrelu", "y", y, mean=mean, var=var, weight=weight, bias=bias)
    return torch.empty_like(y, memory_format=kernel_memory_format(y))


@torch.library.custom_op("madfast::bn_lrelu_backward_aten", mutates_args=())
def _bn_lrelu_backward(grad: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                       weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, negative_slope: float,
                       batch_stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_y, grad_weight, grad_bias), grad_y rounded once to y's dtype (as eager BatchNorm's
    backward): with batch statistics it includes their dependence on y, through y − mean taken
    explicitly. The (C,) gradients are fp32 (fp64 for fp64)."""
    acc = acc_dtype(y.dtype)
    invstd, scale, shift = (t.to(acc) for t in fold_bn(mean, var, weight, bias, eps))
    c = (1, -1, 1, 1)
    yf = y.to(acc)
    g = grad.to(acc)
    gz = torch.where(yf * scale.view(c) + shift.view(c) > 0, g, g * negative_slope)
    xhat = (yf - mean.to(acc).view(c)) * invstd.view(c)
    grad_bias = gz.sum((0, 2, 3))
    grad_weight = (gz * xhat).sum((0, 2, 3))
    gamma = weight.to(acc) if weight is not None else torch.ones_like(invstd)
    if batch_stats:
        count = y.numel() // max(y.shape[1], 1)
        gz = gz - (grad_bias / count).view(c) - xhat * (grad_weight / count).view(c)
    grad_y = (gz * (gamma * invstd).view(c)).to(y.dtype).contiguous(memory_format=kernel_memory_format(y))
    return grad_y, grad_weight, grad_bias


@_bn_lrelu_backward.register_fake
def _(grad, y, mean, var, weight, bias, eps, negative_slope, batch_stats):
    check_devices("bn_lrelu_backward", "y", y, grad=grad, mean=mean, var=var, weight=weight, bias=bias)
    acc = acc_dtype(y.dtype)
    return (torch.empty_like(y, memory_format=kernel_memory_format(y)), y.new_empty(y.shape[1], dtype=acc),
            y.new_empty(y.shape[1], dtype=acc))


def _bn_setup(ctx, inputs, output):
    y, mean, var, weight, bias, eps, slope, batch_stats = inputs
    ctx.save_for_backward(y, mean, var, weight, bias)
    ctx.eps, ctx.slope, ctx.batch_stats = eps, slope, batch_stats


def _bn_backward(ctx, grad):
    y, mean, var, weight, bias = ctx.saved_tensors
    g_y, g_w, g_b = torch.ops.madfast.bn_lrelu_backward_aten(grad, y, mean, var, weight, bias, ctx.eps, ctx.slope,
                                                             ctx.batch_stats)
    # mean and var get no gradient: with batch statistics g_y already carries it (BatchNorm's backward)
    return (g_y, None, None, g_w.to(weight.dtype) if weight is not None else None,
            g_b.to(bias.dtype) if bias is not None else None, None, None, None)


_bn_lrelu.register_autograd(_bn_backward, setup_context=_bn_setup)


def bn_lrelu_aten(y: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, eps: float, negative_slope: float, batch_stats: bool) -> torch.Tensor:
    """LeakyReLU(BatchNorm(y)) normalised with ``mean`` and biased ``var`` (C,): y's own batch
    moments (``batch_stats``: the gradient then flows as through BatchNorm's batch statistics, folded
    into grad_y, none to mean/var) or the running statistics. One pass forward (bn_lrelu kernels)."""
    return torch.ops.madfast.bn_lrelu_aten(y, mean, var, weight, bias, float(eps), float(negative_slope), batch_stats)
