"""madfast.ops.bn_stat_loss over the fused per-channel moments op.

``madfast::channel_moments`` (csrc/) / ``madfast::channel_moments_triton`` read x once for the
(C,) mean and biased variance; their backward reads x once more and writes grad_x. The two
norms on (C,) vectors are plain torch ops.
"""

from __future__ import annotations

import importlib.util

import torch

from madfast import _backend
from madfast.ops._checks import check_floating
from madfast.ops._dtypes import acc_dtype
from madfast.ops.bn_stats.reference import torch_bn_stat_loss

__all__ = ["bn_stat_loss", "channel_moments", "check_bn_args"]


def check_bn_args(x, running_mean, running_var) -> None:
    op = "bn_stat_loss"
    check_floating(op, "x", x, ndim=4)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        check_floating(op, name, t, ndim=1)
        if t.shape[0] != x.shape[1]:
            raise ValueError(f"{op}: {name} has {t.shape[0]} entries but x has {x.shape[1]} channels")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _fake_moments(x):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


def _fake_moments_backward(grad_mean, grad_var, x, mean):
    return torch.empty_like(x)


def _moments_setup(backward_op: str):
    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[0])
        ctx.backward_op = backward_op
    return setup


def _moments_backward(ctx, g_mean, g_var):
    x, mean = ctx.saved_tensors
    g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
    g_var = torch.zeros_like(mean) if g_var is None else g_var
    return getattr(torch.ops.madfast, ctx.backward_op)(g_mean, g_var, x, mean)


if _backend.has_kernel("channel_moments", "CPU") or _backend.has_kernel("channel_moments", "CUDA"):
    torch.library.register_fake("madfast::channel_moments")(_fake_moments)
    torch.library.register_fake("madfast::channel_moments_backward")(_fake_moments_backward)
    torch.library.register_autograd("madfast::channel_moments", _moments_backward,
                                    setup_context=_moments_setup("channel_moments_backward"))

if importlib.util.find_spec("triton") is not None:
    # Opaque custom ops, as in madfast.ops.kl.op.
    from madfast.ops.bn_stats.triton_kernel import triton_channel_moments, triton_channel_moments_backward

    @torch.library.custom_op("madfast::channel_moments_triton", mutates_args=())
    def _channel_moments_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_channel_moments(x)

    @torch.library.custom_op("madfast::channel_moments_backward_triton", mutates_args=())
    def _channel_moments_backward_triton(grad_mean: torch.Tensor, grad_var: torch.Tensor, x: torch.Tensor,
                                         mean: torch.Tensor) -> torch.Tensor:
        return triton_channel_moments_backward(grad_mean, grad_var, x, mean)

    _channel_moments_triton.register_fake(_fake_moments)
    _channel_moments_backward_triton.register_fake(_fake_moments_backward)
    _channel_moments_triton.register_autograd(_moments_backward,
                                              setup_context=_moments_setup("channel_moments_backward_triton"))


def channel_moments(x: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (N, C, H, W) over (N, H, W), differentiable;
    (C,) each, fp32 (fp64 for fp64)."""
    check_floating("channel_moments", "x", x, ndim=4)
    chosen = _backend.choose("channel_moments", backend, x.device)
    if chosen == "torch":
        xf = x.to(acc_dtype(x.dtype))
        return xf.mean(dim=(0, 2, 3)), xf.var(dim=(0, 2, 3), unbiased=False)
    return _backend.compiled_op("channel_moments", chosen)(x)


def bn_stat_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, *,
                 backend: str = "auto") -> torch.Tensor:
    """DeepInversion's regulariser for one BatchNorm layer's input, with gradient to x.

    Args:
        x: (N, C, H, W), contiguous or channels_last (other layouts are copied first).
        running_mean, running_var: (C,) the layer's running statistics (no gradient).
        backend: "auto", "torch", "triton", "cuda" or "cpp".
    Returns:
        ‖mean_c(x) − running_mean‖₂ + ‖var_c(x) − running_var‖₂ (biased variance over N, H, W),
        a 0-d tensor in x's dtype.
    """
    check_bn_args(x, running_mean, running_var)
    chosen = _backend.choose("channel_moments", backend, x.device)
    if chosen == "torch":
        return torch_bn_stat_loss(x, running_mean, running_var)
    mean, var = _backend.compiled_op("channel_moments", chosen)(x)
    loss = (torch.linalg.vector_norm(mean - running_mean.to(mean.dtype))
            + torch.linalg.vector_norm(var - running_var.to(var.dtype)))
    return loss.to(x.dtype)
