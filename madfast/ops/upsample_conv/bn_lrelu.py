"""The generator block's tail, fused: out = LeakyReLU(y·scale_c + shift_c), and in the backward,
grad_y = grad·LeakyReLU'(z)·scale_c with the per-channel sums Σ grad·LeakyReLU'(z)·y and
Σ grad·LeakyReLU'(z) (the gradients of scale and shift) taken in the same pass.

scale and shift fold BatchNorm: scale = γ/√(var + ε), shift = β − mean·scale, so autograd carries
their gradients on to γ, β and the batch statistics (madfast.nn.fused_block).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from madfast import _backend
from madfast.ops._checks import check_floating, check_same
from madfast.ops._dtypes import acc_dtype
from madfast.ops._layout import kernel_memory_format

__all__ = ["bn_lrelu"]

BLOCK = 1024
MAX_SPLIT = 8  # programs per channel: a long M = N·H·W is split so that few channels still fill a GPU


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


def _setup(backward_op: str):
    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1], inputs[2])
        ctx.negative_slope = inputs[3]
        ctx.backward_op = backward_op
    return setup


def _backward(ctx, grad):
    y, scale, shift = ctx.saved_tensors
    g_y, g_scale, g_shift = getattr(torch.ops.madfast, ctx.backward_op)(grad, y, scale, shift, ctx.negative_slope)
    return g_y, g_scale.to(scale.dtype), g_shift.to(shift.dtype), None


if _backend.has_kernel("bn_lrelu", "CPU") or _backend.has_kernel("bn_lrelu", "CUDA"):
    torch.library.register_fake("madfast::bn_lrelu")(_fake_fwd)
    torch.library.register_fake("madfast::bn_lrelu_backward")(_fake_bwd)
    torch.library.register_autograd("madfast::bn_lrelu", _backward, setup_context=_setup("bn_lrelu_backward"))

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from madfast.ops.bn_stats.triton_kernel import moments_view

    @triton.jit
    def _bn_lrelu_kernel(
        y_ptr, out_ptr, g_ptr, gy_ptr,  # (N, C, H, W) with strides s_n, s_c, s_hw (out, g, gy: y's layout)
        scale_ptr, shift_ptr, gscale_ptr, gshift_ptr,  # (C,) in ACC; the gradients zeroed
        N, HW, s_n, s_c, s_hw, slope, splits,
        BACKWARD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0).to(tl.int64)
        part = tl.program_id(1)
        M = N * HW
        chunk = tl.cdiv(M, splits)
        scale = tl.load(scale_ptr + c)
        shift = tl.load(shift_ptr + c)
        acc_scale = tl.zeros((BLOCK,), ACC)  # fp32; fp64 for fp64 y
        acc_shift = tl.zeros((BLOCK,), ACC)
        for start in range(part * chunk, tl.minimum(part * chunk + chunk, M), BLOCK):
            i = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = (i < M) & (i < part * chunk + chunk)
            n = i // HW
            off = n * s_n + c * s_c + (i - n * HW) * s_hw
            y = tl.load(y_ptr + off, mask=mask, other=0.0).to(ACC)
            z = y * scale + shift
            if BACKWARD:
                g = tl.load(g_ptr + off, mask=mask, other=0.0).to(ACC)
                gz = tl.where(z > 0, g, g * slope)
                tl.store(gy_ptr + off, (gz * scale).to(gy_ptr.dtype.element_ty), mask=mask)
                acc_scale += tl.where(mask, gz * y, 0.0)
                acc_shift += tl.where(mask, gz, 0.0)
            else:
                tl.store(out_ptr + off, tl.where(z > 0, z, z * slope).to(out_ptr.dtype.element_ty), mask=mask)
        if BACKWARD:
            tl.atomic_add(gscale_ptr + c, tl.sum(acc_scale, 0).to(gscale_ptr.dtype.element_ty))
            tl.atomic_add(gshift_ptr + c, tl.sum(acc_shift, 0).to(gshift_ptr.dtype.element_ty))

    def _launch(y, scale, shift, slope, grad=None):
        y, s_n, s_c, s_hw, _ = moments_view(y)
        N, C, H, W = y.shape
        out = torch.empty_like(y)
        acc = acc_dtype(y.dtype)
        g_scale = torch.zeros(C, dtype=acc, device=y.device)
        g_shift = torch.zeros_like(g_scale)
        if y.numel():
            g = grad.contiguous(memory_format=torch.channels_last if s_c == 1 and C > 1 else
                                torch.contiguous_format) if grad is not None else y
            splits = min(MAX_SPLIT, triton.cdiv(N * H * W, BLOCK))
            _bn_lrelu_kernel[(C, splits)](
                y, out, g, out, scale.to(acc).contiguous(), shift.to(acc).contiguous(), g_scale, g_shift,
                N, H * W, s_n, s_c, s_hw, float(slope), splits, BACKWARD=grad is not None,
                ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=BLOCK)
        return out, g_scale, g_shift

    @torch.library.custom_op("madfast::bn_lrelu_triton", mutates_args=())
    def _bn_lrelu_triton(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                         negative_slope: float) -> torch.Tensor:
        return _launch(y, scale, shift, negative_slope)[0]

    @torch.library.custom_op("madfast::bn_lrelu_backward_triton", mutates_args=())
    def _bn_lrelu_backward_triton(grad: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                                  negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch(y, scale, shift, negative_slope, grad)

    _bn_lrelu_triton.register_fake(_fake_fwd)
    _bn_lrelu_backward_triton.register_fake(_fake_bwd)
    _bn_lrelu_triton.register_autograd(_backward, setup_context=_setup("bn_lrelu_backward_triton"))


def bn_lrelu(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, negative_slope: float,
             backend: str) -> torch.Tensor:
    """LeakyReLU(y·scale_c + shift_c) for y (N, C, H, W) and (C,) scale/shift, in y's dtype."""
    if backend != "torch":
        return _backend.compiled_op("bn_lrelu", backend)(y, scale, shift, float(negative_slope))
    acc = acc_dtype(y.dtype)
    z = y.to(acc) * scale.to(acc).view(1, -1, 1, 1) + shift.to(acc).view(1, -1, 1, 1)
    return F.leaky_relu(z, negative_slope).to(y.dtype)
