"""madfast.ops.upsample_conv: conv3×3(bilinear-upsample×2(x)) with BatchNorm's per-channel sums.

On the "triton" backend (``madfast::upsample_conv_triton``) no up-sampled tensor is ever
written: the forward is an implicit GEMM whose loader interpolates, the weight gradient the same
GEMM transposed, and the input gradient a conv-transpose GEMM chained with the bilinear adjoint
per tile of input pixels. Other backends run the torch reference. Not yet tuned on a GPU.
"""

from __future__ import annotations

import importlib.util

import torch

from madfast import _backend
from madfast.ops._checks import check_floating, check_same
from madfast.ops.upsample_conv.reference import torch_upsample_conv

__all__ = ["upsample_conv"]


def _check(x, weight) -> None:
    op = "upsample_conv"
    check_floating(op, "x", x, ndim=4)
    check_floating(op, "weight", weight, ndim=4)
    check_same(op, "weight", weight, "x", x, shape=False)
    if tuple(weight.shape[1:]) != (x.shape[1], 3, 3):
        raise ValueError(f"{op}: weight must have shape (Cout, {x.shape[1]}, 3, 3) for x with {x.shape[1]} "
                         f"channels, got {tuple(weight.shape)}")


def _fake(x, weight, stats):
    N, _, H, W = x.shape
    y = x.new_empty((N, weight.shape[0], 2 * H, 2 * W))
    width = weight.shape[0] if stats else 0
    return y, x.new_empty(width, dtype=torch.float32), x.new_empty(width, dtype=torch.float32)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[0] if inputs[2] else None)


def _backward(ctx, g_y, g_sum, g_sumsq):
    x, weight, y = ctx.saved_tensors
    # Train-mode BatchNorm differentiates through the batch statistics: ∂Σy/∂y = 1, ∂Σy²/∂y = 2y.
    if g_sum is not None and g_sum.numel():
        g_y = g_y + g_sum.view(1, -1, 1, 1).to(g_y.dtype)
    if g_sumsq is not None and g_sumsq.numel():
        g_y = g_y + 2 * y * g_sumsq.view(1, -1, 1, 1).to(g_y.dtype)
    g_x, g_w = torch.ops.madfast.upsample_conv_backward_triton(g_y, x, weight, *ctx.needs_input_grad[:2])
    return (g_x if ctx.needs_input_grad[0] else None), (g_w if ctx.needs_input_grad[1] else None), None


def _fake_backward(grad_y, x, weight, grad_input, grad_weight):
    return (torch.empty_like(x) if grad_input else x.new_empty(0),
            torch.empty_like(weight) if grad_weight else weight.new_empty(0))


if importlib.util.find_spec("triton") is not None:
    from madfast.ops.upsample_conv.triton_kernel import (
        triton_upsample_conv_fwd,
        triton_upsample_conv_grad_input,
        triton_upsample_conv_grad_weight,
    )

    @torch.library.custom_op("madfast::upsample_conv_triton", mutates_args=())
    def _upsample_conv_triton(x: torch.Tensor, weight: torch.Tensor,
                              stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_upsample_conv_fwd(x, weight, stats)

    @torch.library.custom_op("madfast::upsample_conv_backward_triton", mutates_args=())
    def _upsample_conv_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, grad_input: bool,
                                       grad_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
        grad_y = grad_y.contiguous()
        g_x = triton_upsample_conv_grad_input(grad_y, weight, x.shape, x) if grad_input else x.new_empty(0)
        g_w = (triton_upsample_conv_grad_weight(x, grad_y, weight.shape).to(weight.dtype) if grad_weight
               else weight.new_empty(0))
        return g_x, g_w

    _upsample_conv_triton.register_fake(_fake)
    _upsample_conv_triton.register_autograd(_backward, setup_context=_setup)
    _upsample_conv_backward_triton.register_fake(_fake_backward)


# "auto" keeps the reference until the Triton kernels have been measured against cuDNN on a GPU;
# backend="triton" (or MADFAST_BACKEND=triton) takes the fused path.
AUTO = ("torch",)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, *, stats: bool = False,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """conv3×3(bilinear-upsample×2(x)), stride 1, padding 1, no bias.

    Args:
        x: (N, Cin, H, W), contiguous or channels_last.
        weight: (Cout, Cin, 3, 3), same dtype and device.
        stats: also return Σy and Σy² per output channel (fp32), for BatchNorm.
        backend: "auto" (the reference for now, see AUTO), "torch" or "triton".
    Returns:
        (y (N, Cout, 2H, 2W), Σy or None, Σy² or None).
    """
    _check(x, weight)
    chosen = _backend.choose("upsample_conv", backend, x.device, auto=AUTO)
    if chosen in ("cpp", "cuda"):
        raise _backend.BackendUnavailableError(f"upsample_conv: backend={chosen!r} is not implemented yet")
    if chosen == "torch":
        y = torch_upsample_conv(x, weight)
        if not stats:
            return y, None, None
        yf = y.float()
        return y, yf.sum((0, 2, 3)), yf.square().sum((0, 2, 3))
    y, s, ss = torch.ops.madfast.upsample_conv_triton(x, weight, stats)
    return (y, s, ss) if stats else (y, None, None)
