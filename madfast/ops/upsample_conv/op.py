"""madfast.ops.upsample_conv: conv3×3(bilinear-upsample×2(x)) with BatchNorm's per-channel statistics.

Backends: "torch" (reference.py), "aten" (aten_path.py: ATen's convolution, Welford moments, a
gather-form bilinear adjoint) and "triton" (triton_kernel.py: implicit GEMMs that never write the
up-sampled tensor, moments from per-tile partials). Both fused backends give (y, batch mean, biased
batch variance) and fold the statistics' gradients into grad_y in their backward.

"auto": the torch reference on CPU; on CUDA "aten", then "triton", each only where `madfast check`
verified it on this GPU architecture (madfast._backend.OPS).
"""

from __future__ import annotations

import importlib.util

import torch

from madfast import _backend
from madfast.ops._checks import check_floating, check_same
from madfast.ops._dtypes import acc_dtype
from madfast.ops._layout import kernel_memory_format
from madfast.ops.bn_stats.reference import torch_channel_moments
from madfast.ops.upsample_conv import aten_path  # noqa: F401  (registers madfast::upsample_conv_aten)
from madfast.ops.upsample_conv.reference import torch_upsample_conv

__all__ = ["upsample_conv", "upsample_conv_moments"]


def _check(x, weight) -> None:
    op = "upsample_conv"
    check_floating(op, "x", x, ndim=4)
    check_floating(op, "weight", weight, ndim=4)
    check_same(op, "weight", weight, "x", x, shape=False)
    if tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"{op}: weight must have shape (Cout, {x.shape[1]}, 3, 3) for x with {x.shape[1]} "
                         f"channels, got {tuple(weight.shape)}")


def _check_backward(grad_y, x, weight, y, mean, grad_mean, grad_var) -> None:
    """The backward op's own checks, naming each argument as its schema does."""
    op = "upsample_conv_backward"
    _check(x, weight)
    out_shape = (x.shape[0], weight.shape[0], 2 * x.shape[2], 2 * x.shape[3])
    check_floating(op, "grad_y", grad_y, ndim=4)
    check_same(op, "grad_y", grad_y, "x", x, shape=False)
    if tuple(grad_y.shape) != out_shape:
        raise ValueError(f"{op}: grad_y must have shape {out_shape}, got {tuple(grad_y.shape)}")
    for name, t in (("mean", mean), ("grad_mean", grad_mean), ("grad_var", grad_var)):
        if t is not None and tuple(t.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: {name} must have shape ({weight.shape[0]},), got {tuple(t.shape)}")
        if t is not None:
            check_same(op, name, t, "x", x, shape=False, dtype=False)
    if grad_var is not None:
        for name, t in (("y", y), ("mean", mean)):
            if t is None:
                raise ValueError(f"{op}: {name} (the forward's output) must be given when grad_var is")
        check_same(op, "y", y, "grad_y", grad_y)


def _fake(x, weight, stats):
    _check(x, weight)  # here too: a meta tensor beside a real one sends the dispatcher to this fake
    N, _, H, W = x.shape
    y = torch.empty((N, weight.shape[0], 2 * H, 2 * W), dtype=x.dtype, device=x.device,
                    memory_format=kernel_memory_format(x))
    width = weight.shape[0] if stats else 0
    acc = acc_dtype(x.dtype)
    return y, x.new_empty(width, dtype=acc), x.new_empty(width, dtype=acc)


if importlib.util.find_spec("triton") is not None:
    from madfast.ops.upsample_conv.triton_kernel import (
        GradFold,
        triton_upsample_conv_fwd,
        triton_upsample_conv_grad_input,
        triton_upsample_conv_grad_weight,
    )

    @torch.library.custom_op("madfast::upsample_conv_triton", mutates_args=())
    def _upsample_conv_triton(x: torch.Tensor, weight: torch.Tensor,
                              stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_upsample_conv_fwd(x, weight, stats)

    @torch.library.custom_op("madfast::upsample_conv_backward_triton", mutates_args=())
    def _upsample_conv_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                       y: torch.Tensor | None, mean: torch.Tensor | None,
                                       grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None,
                                       grad_input: bool, grad_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
        _check_backward(grad_y, x, weight, y, mean, grad_mean, grad_var)
        # ∂mean/∂y = 1/M, ∂var/∂y = 2(y − mean)/M: the kernels' fold with g_Σ = g_mean/M, g_Σ² = g_var/M;
        # (Cout,) gradients arrive expanded (stride 0) from a sum: the kernels index them densely
        count = grad_y.numel() // max(grad_y.shape[1], 1)
        grad_sum, grad_sumsq = (None if t is None else (t.to(acc_dtype(x.dtype)) / count).contiguous()
                                for t in (grad_mean, grad_var))
        fold = GradFold(y if grad_sumsq is not None else grad_y, grad_sum, grad_sumsq,
                        mean.to(acc_dtype(x.dtype)).contiguous() if grad_sumsq is not None else None)
        g_x = triton_upsample_conv_grad_input(grad_y, weight, x, fold) if grad_input else x.new_empty(0)
        g_w = (triton_upsample_conv_grad_weight(x, grad_y, weight.shape, fold).to(weight.dtype) if grad_weight
               else weight.new_empty(0))
        return g_x, g_w

    def _setup_triton(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1], *(output[:2] if inputs[2] else (None, None)))

    def _backward_triton(ctx, g_y, g_mean, g_var):
        x, weight, y, mean = ctx.saved_tensors
        g_mean = g_mean if g_mean is not None and g_mean.numel() else None
        g_var = g_var if g_var is not None and g_var.numel() else None
        g_x, g_w = torch.ops.madfast.upsample_conv_backward_triton(
            g_y, x, weight, *((y, mean) if g_var is not None else (None, None)), g_mean, g_var,
            *ctx.needs_input_grad[:2])
        return (g_x if ctx.needs_input_grad[0] else None), (g_w if ctx.needs_input_grad[1] else None), None

    def _fake_backward_triton(grad_y, x, weight, y, mean, grad_mean, grad_var, grad_input, grad_weight):
        _check_backward(grad_y, x, weight, y, mean, grad_mean, grad_var)
        return (torch.empty_like(x) if grad_input else x.new_empty(0),
                torch.empty_like(weight) if grad_weight else weight.new_empty(0))

    _upsample_conv_triton.register_fake(_fake)
    _upsample_conv_triton.register_autograd(_backward_triton, setup_context=_setup_triton)
    _upsample_conv_backward_triton.register_fake(_fake_backward_triton)


def _moments_op(backend: str):
    """madfast::upsample_conv_aten or _triton: (y, batch mean, biased batch variance)."""
    return getattr(torch.ops.madfast, f"upsample_conv_{backend}")


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, *, stats: bool = False,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """conv3×3(bilinear-upsample×2(x)), stride 1, padding 1, no bias.

    Args:
        x: (N, Cin, H, W), contiguous or channels_last.
        weight: (Cout, Cin, 3, 3), same dtype and device.
        stats: also return Σy and Σy² per output channel (fp32, fp64 for fp64), for BatchNorm.
        backend: "auto" (madfast._backend.OPS), "torch", "triton" or "aten" (fused around ATen's
            convolution; y is then channels_last).
    Returns:
        (y (N, Cout, 2H, 2W), Σy or None, Σy² or None).
    """
    _check(x, weight)
    chosen = _backend.choose("upsample_conv", backend, x.device, dtype=x.dtype)
    # "aten" and "triton" give the batch moments: Σy = M·mean and Σy² = M·(var + mean²) over the
    # M = N·2H·2W values of a channel. With no values there are no moments; the sums, taken of
    # the empty y as the reference takes them, are 0 (and differentiable like the reference's).
    count = x.shape[0] * 4 * x.shape[2] * x.shape[3]
    if chosen == "torch":
        y = torch_upsample_conv(x, weight)
    else:
        y, mean, var = _moments_op(chosen)(x, weight, stats and count > 0)
        if stats and count > 0:
            return y, mean * count, (var + mean.square()) * count
    if not stats:
        return y, None, None
    yf = y.to(acc_dtype(y.dtype))
    return y, yf.sum((0, 2, 3)), yf.square().sum((0, 2, 3))


def upsample_conv_moments(x: torch.Tensor, weight: torch.Tensor, *, stats: bool = True,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y, batch mean, biased batch variance) per output channel, what train-mode BatchNorm
    normalises y with; the moments (fp32, fp64 for fp64) are None when ``stats`` is False. No
    backend takes the variance as E[y²]−E[y]², which loses it in fp32 when |mean| ≫ std."""
    _check(x, weight)
    chosen = _backend.choose("upsample_conv", backend, x.device, dtype=x.dtype)
    if chosen == "torch":
        y = torch_upsample_conv(x, weight)
        return (y, *torch_channel_moments(y)) if stats else (y, None, None)
    y, mean, var = _moments_op(chosen)(x, weight, stats)
    return (y, mean, var) if stats else (y, None, None)
