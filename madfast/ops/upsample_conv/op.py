"""madfast.ops.upsample_conv: conv3×3(bilinear-upsample×2(x)) with BatchNorm's per-channel statistics.

"aten" (``madfast::upsample_conv_aten``, aten_path.py): ATen's convolution (cuDNN / oneDNN) on an
up-sampled tensor that is not kept for backward, Welford batch moments, a gather-form bilinear
adjoint. No other compiled backend ever writes the up-sampled tensor. "triton"
(``madfast::upsample_conv_triton``): the forward is an implicit GEMM whose loader interpolates,
with per-tile mean/M2 partials in the epilogue (Chan-combined: batch mean and variance), the weight
gradient the same GEMM transposed, the input gradient a conv-transpose GEMM chained with the
bilinear adjoint per tile of input pixels. "cuda" and "cpp" (``madfast::upsample_conv``, csrc/):
the same three computations with the sums Σy, Σy², tiled SIMT GEMMs on the GPU and row-at-a-time
loops on the CPU sharing their per-element math (csrc/upsample_conv.h) — the CUDA ones are kept as
the oracle that tests/cuda_emulator runs on the CPU, not as a speed path (no tensor cores); BatchNorm's
moments on these two come from the BN-statistics moments op of the same backend, not from the sums.
Every backward folds the gradients of the statistics into grad_y. None is measured on a GPU yet, so
"auto" keeps the torch reference until `madfast check` verifies one (AUTO).

Measured (2-core CPU, torch 2.14.1, fp32, train-mode block fwd+bwd, 2026-11-25): "cpp" runs at
0.05–0.11× eager (oneDNN's convolution on the materialised upsample), so on CPUs the reference
stays; the GPU comparison against cuDNN, which decides "auto" there, is still to be made.
"""

from __future__ import annotations

import importlib.util

import torch

from madfast import _backend
from madfast.ops._checks import check_devices, check_floating, check_same
from madfast.ops._dtypes import acc_dtype
from madfast.ops._layout import kernel_memory_format
from madfast.ops.upsample_conv.aten_path import upsample_conv_aten
from madfast.ops.upsample_conv.moments import torch_channel_moments
from madfast.ops.upsample_conv.reference import torch_upsample_conv

__all__ = ["upsample_conv", "upsample_conv_moments", "AUTO", "auto_order"]


def _check(x, weight) -> None:
    op = "upsample_conv"
    check_floating(op, "x", x, ndim=4)
    check_floating(op, "weight", weight, ndim=4)
    check_same(op, "weight", weight, "x", x, shape=False)
    if tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"{op}: weight must have shape (Cout, {x.shape[1]}, 3, 3) for x with {x.shape[1]} "
                         f"channels, got {tuple(weight.shape)}")


def _check_backward(grad_y, x, weight, y, grad_sum, grad_sumsq, names=("grad_sum", "grad_sumsq")) -> None:
    """The backward op's own checks (the C++ op makes the same ones in csrc/upsample_conv.h);
    ``names``: what the two (Cout,) gradients are called in the op's schema."""
    op = "upsample_conv_backward"
    _check(x, weight)
    out_shape = (x.shape[0], weight.shape[0], 2 * x.shape[2], 2 * x.shape[3])
    check_floating(op, "grad_y", grad_y, ndim=4)
    check_same(op, "grad_y", grad_y, "x", x, shape=False)
    if tuple(grad_y.shape) != out_shape:
        raise ValueError(f"{op}: grad_y must have shape {out_shape}, got {tuple(grad_y.shape)}")
    for name, t in zip(names, (grad_sum, grad_sumsq)):
        if t is not None and tuple(t.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: {name} must have shape ({weight.shape[0]},), got {tuple(t.shape)}")
        if t is not None:
            check_same(op, name, t, "x", x, shape=False, dtype=False)
    if grad_sumsq is not None:
        if y is None:
            raise ValueError(f"{op}: y (the forward's output) must be given when {names[1]} is")
        check_same(op, "y", y, "grad_y", grad_y)


def _fake(x, weight, stats):
    _check(x, weight)  # here too: a meta tensor beside a real one sends the dispatcher to this fake
    N, _, H, W = x.shape
    y = torch.empty((N, weight.shape[0], 2 * H, 2 * W), dtype=x.dtype, device=x.device,
                    memory_format=kernel_memory_format(x))
    width = weight.shape[0] if stats else 0
    acc = acc_dtype(x.dtype)
    return y, x.new_empty(width, dtype=acc), x.new_empty(width, dtype=acc)


def _grad_buffers(x, weight, grad_input, grad_weight):
    return (torch.empty_like(x) if grad_input else x.new_empty(0),
            torch.empty_like(weight) if grad_weight else weight.new_empty(0))


def _fake_backward(grad_y, x, weight, y, grad_sum, grad_sumsq, grad_input, grad_weight):
    _check_backward(grad_y, x, weight, y, grad_sum, grad_sumsq)  # a meta argument beside real ones lands here
    return _grad_buffers(x, weight, grad_input, grad_weight)


def _setup(backward_op: str):
    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1], output[0] if inputs[2] else None)
        ctx.backward_op = backward_op
    return setup


def _backward(ctx, g_y, g_sum, g_sumsq):
    x, weight, y = ctx.saved_tensors
    # Train-mode BatchNorm differentiates through the batch statistics; the kernels fold those
    # gradients into grad_y as they read it (see the backward schema in csrc/madfast.cpp).
    g_sum = g_sum if g_sum is not None and g_sum.numel() else None
    g_sumsq = g_sumsq if g_sumsq is not None and g_sumsq.numel() else None
    g_x, g_w = getattr(torch.ops.madfast, ctx.backward_op)(
        g_y, x, weight, y if g_sumsq is not None else None, g_sum, g_sumsq, *ctx.needs_input_grad[:2])
    return (g_x if ctx.needs_input_grad[0] else None), (g_w if ctx.needs_input_grad[1] else None), None


if _backend.has_kernel("upsample_conv", "CPU") or _backend.has_kernel("upsample_conv", "CUDA"):
    torch.library.register_fake("madfast::upsample_conv")(_fake)
    torch.library.register_fake("madfast::upsample_conv_backward")(_fake_backward)
    torch.library.register_autograd("madfast::upsample_conv", _backward, setup_context=_setup("upsample_conv_backward"))

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
        _check_backward(grad_y, x, weight, y, grad_mean, grad_var, names=("grad_mean", "grad_var"))
        if grad_var is not None and mean is None:
            raise ValueError("upsample_conv_backward: mean (the forward's output) must be given when grad_var is")
        # ∂mean/∂y = 1/M, ∂var/∂y = 2(y − mean)/M: the kernels' fold with g_Σ = g_mean/M, g_Σ² = g_var/M;
        # (Cout,) gradients arrive expanded (stride 0) from a sum: the kernels index them densely
        count = grad_y.numel() // max(grad_y.shape[1], 1)
        grad_sum, grad_sumsq = (None if t is None else (t.to(acc_dtype(x.dtype)) / count).contiguous()
                                for t in (grad_mean, grad_var))
        fold = GradFold(y if grad_sumsq is not None else grad_y, grad_sum, grad_sumsq,
                        mean.to(acc_dtype(x.dtype)).contiguous() if grad_sumsq is not None else None)
        g_x = triton_upsample_conv_grad_input(grad_y, weight, x.shape, x, fold) if grad_input else x.new_empty(0)
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
        _check_backward(grad_y, x, weight, y, grad_mean, grad_var, names=("grad_mean", "grad_var"))
        check_devices("upsample_conv_backward", "x", x, mean=mean)
        return _grad_buffers(x, weight, grad_input, grad_weight)

    _upsample_conv_triton.register_fake(_fake)
    _upsample_conv_triton.register_autograd(_backward_triton, setup_context=_setup_triton)
    _upsample_conv_backward_triton.register_fake(_fake_backward_triton)


def _moments_op(backend: str):
    """The op that returns (y, batch mean, biased batch variance): "aten" or "triton"."""
    return upsample_conv_aten if backend == "aten" else torch.ops.madfast.upsample_conv_triton


# The candidates "auto" tries, per device type, in order. On CUDA tensors each fused one is taken
# only where `madfast check` verified it on this GPU architecture (madfast._verified); on CPUs the
# reference stays (oneDNN on the materialised upsample beats the C++ kernels, see above).
AUTO = {"cuda": ("aten", "triton", "cuda", "torch"), "cpu": ("torch",)}


def auto_order(device: torch.device) -> tuple[str, ...]:
    """AUTO's candidates for tensors on ``device``."""
    return AUTO.get(device.type, ("torch",))


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, *, stats: bool = False,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """conv3×3(bilinear-upsample×2(x)), stride 1, padding 1, no bias.

    Args:
        x: (N, Cin, H, W), contiguous or channels_last.
        weight: (Cout, Cin, 3, 3), same dtype and device.
        stats: also return Σy and Σy² per output channel (fp32, fp64 for fp64), for BatchNorm.
        backend: "auto" (see AUTO), "torch", "triton", "cuda", "cpp" or "aten" (fused around
            ATen's convolution; y is then channels_last).
    Returns:
        (y (N, Cout, 2H, 2W), Σy or None, Σy² or None).
    """
    _check(x, weight)
    chosen = _backend.choose("upsample_conv", backend, x.device, auto=auto_order(x.device), dtype=x.dtype)
    if chosen in ("aten", "triton"):  # these give the batch moments: the sums derive from them
        y, mean, var = _moments_op(chosen)(x, weight, stats)
        if not stats:
            return y, None, None
        count = y.numel() // max(y.shape[1], 1)
        return y, mean * count, (var + mean.square()) * count
    if chosen == "torch":
        y = torch_upsample_conv(x, weight)
        if not stats:
            return y, None, None
        yf = y.to(acc_dtype(y.dtype))
        return y, yf.sum((0, 2, 3)), yf.square().sum((0, 2, 3))
    y, s, ss = _backend.compiled_op("upsample_conv", chosen)(x, weight, stats)
    return (y, s, ss) if stats else (y, None, None)


def upsample_conv_moments(x: torch.Tensor, weight: torch.Tensor, *, stats: bool = True,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y, batch mean, biased batch variance) per output channel — what train-mode BatchNorm
    normalises y with; the moments (fp32, fp64 for fp64) are None when ``stats`` is False.

    No backend takes the variance as E[y²]−E[y]² (which loses it in fp32 when |mean| ≫ std):
    "aten" and "triton" by Welford / Chan-combined partials of their own; "cpp" and "cuda" by the
    same backend's BN-statistics moments op (pivoted partials combined in a fixed order — no float
    atomics) on y; "torch" by ATen's var_mean."""
    _check(x, weight)
    chosen = _backend.choose("upsample_conv", backend, x.device, auto=auto_order(x.device), dtype=x.dtype)
    if chosen in ("aten", "triton"):
        y, mean, var = _moments_op(chosen)(x, weight, stats)
        return (y, mean, var) if stats else (y, None, None)
    # the ops themselves (x checked, backend chosen above); channel_moments not through bn_stats'
    # front end: the block's backend is chosen (and verified) as upsample_conv's, and `madfast check`
    # must not credit the block's time to channel_moments
    if chosen == "torch":
        y = torch_upsample_conv(x, weight)
        return (y, *torch_channel_moments(y)) if stats else (y, None, None)
    y = _backend.compiled_op("upsample_conv", chosen)(x, weight, False)[0]
    return (y, *_backend.compiled_op("channel_moments", chosen)(y)) if stats else (y, None, None)
