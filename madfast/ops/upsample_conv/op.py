"""madfast.ops.upsample_conv: conv3×3(bilinear-upsample×2(x)) with BatchNorm's per-channel sums.

Forward: the fused Triton implicit GEMM (``madfast::upsample_conv_triton``) on the "triton"
backend, the torch reference otherwise. Backward (for now): ATen's convolution backward on a
recomputed upsample -- correct, but it still materialises the 4× tensor; the fused adjoint
kernels and the CUDA forward are the open part of the generator-block issue.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

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
    ctx.save_for_backward(inputs[0], inputs[1])


def _backward(ctx, g_y, _g_sum, _g_sumsq):
    # The sums are statistics for BatchNorm's running averages; gradients flow through y only.
    x, weight = ctx.saved_tensors
    up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
    g_up, g_w, _ = torch.ops.aten.convolution_backward(
        g_y, up, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
    g_x = None
    if ctx.needs_input_grad[0]:
        _, g_x = torch.func.vjp(lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True), x)
        g_x = g_x(g_up)[0]
    return g_x, g_w, None


if importlib.util.find_spec("triton") is not None:
    from madfast.ops.upsample_conv.triton_kernel import triton_upsample_conv_fwd

    @torch.library.custom_op("madfast::upsample_conv_triton", mutates_args=())
    def _upsample_conv_triton(x: torch.Tensor, weight: torch.Tensor,
                              stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_upsample_conv_fwd(x, weight, stats)

    _upsample_conv_triton.register_fake(_fake)
    _upsample_conv_triton.register_autograd(_backward, setup_context=_setup)


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, *, stats: bool = False,
                  backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """conv3×3(bilinear-upsample×2(x)), stride 1, padding 1, no bias.

    Args:
        x: (N, Cin, H, W), contiguous or channels_last.
        weight: (Cout, Cin, 3, 3), same dtype and device.
        stats: also return Σy and Σy² per output channel (fp32), for BatchNorm.
        backend: "torch" (default until the fused kernels are tuned on a GPU) or "triton"; "auto"
            picks Triton where it runs.
    Returns:
        (y (N, Cout, 2H, 2W), Σy or None, Σy² or None).
    """
    _check(x, weight)
    chosen = _backend.choose("upsample_conv", backend, x.device)
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
