"""madfast.ops.bn_stat_loss / bn_stat_losses over fused per-channel moments.

``madfast::bn_stat_losses`` (C++ on CPU, CUDA) and ``madfast::bn_stat_losses_triton`` take every
layer at once, moments and both penalties in one op (its backward writes every grad_x), so a
teacher's BN loss costs one dispatch, not one per layer: on a GPU a split reduction over every
layer of a dtype and layout in one launch (csrc/cuda/bn_stat_losses.cuh,
madfast/ops/bn_stats/triton_kernel.py), one read of each x forward and one backward.
"""

from __future__ import annotations

import importlib.util

import torch

from madfast import _backend
from madfast.ops._checks import check_devices, check_floating, check_same
from madfast.ops._dtypes import acc_dtype
from madfast.ops._layout import kernel_memory_format
from madfast.ops._register import present, register
from madfast.ops.bn_stats.layers import check_layers, check_lengths, layers_key
from madfast.ops.bn_stats.reference import torch_bn_stat_loss, torch_channel_moments

__all__ = ["bn_stat_loss", "bn_stat_losses", "channel_moments", "check_bn_args"]


def check_bn_args(x, running_mean, running_var) -> None:
    op = "bn_stat_loss"
    check_floating(op, "x", x, ndim=4)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        check_floating(op, name, t, ndim=1)
        if t.shape[0] != x.shape[1]:
            raise ValueError(f"{op}: {name} has {t.shape[0]} entries but x has {x.shape[1]} channels")
        check_same(op, name, t, "x", x, shape=False, dtype=False)


def _fake_moments(x):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


def _fake_moments_backward(grad_mean, grad_var, x, mean):
    check_devices("channel_moments_backward", "x", x, grad_mean=grad_mean, grad_var=grad_var, mean=mean)
    return torch.empty_like(x)


def _moments_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _moments_backward(backward_op, ctx, g_mean, g_var):
    x, mean = ctx.saved_tensors
    g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
    g_var = torch.zeros_like(mean) if g_var is None else g_var
    return backward_op(g_mean, g_var, x, mean)


def _fake_bn_losses(xs, running_means, running_vars):
    check_layers(layers_key(xs, running_means, running_vars, "bn_stat_losses"), "bn_stat_losses")
    acc = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    x0 = xs[0]
    return (x0.new_empty((), dtype=acc), x0.new_empty((2, sum(x.shape[1] for x in xs)), dtype=acc),
            x0.new_empty((2, len(xs)), dtype=acc))


def _fake_bn_losses_backward(grad, xs, running_means, running_vars, moments, norms):
    check_layers(layers_key(xs, running_means, running_vars, "bn_stat_losses_backward"), "bn_stat_losses_backward")
    check_devices("bn_stat_losses_backward", "x[0]", xs[0], grad_loss=grad, moments=moments, norms=norms)
    return [torch.empty_like(x, memory_format=kernel_memory_format(x)) for x in xs]


if importlib.util.find_spec("triton") is not None:
    # Opaque custom ops, as in madfast.ops.kl.op.
    from madfast.ops.bn_stats.triton_kernel import (triton_bn_stat_losses, triton_bn_stat_losses_backward,
                                                    triton_channel_moments, triton_channel_moments_backward)

    @torch.library.custom_op("madfast::channel_moments_triton", mutates_args=())
    def _channel_moments_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return triton_channel_moments(x)

    @torch.library.custom_op("madfast::channel_moments_backward_triton", mutates_args=())
    def _channel_moments_backward_triton(grad_mean: torch.Tensor, grad_var: torch.Tensor, x: torch.Tensor,
                                         mean: torch.Tensor) -> torch.Tensor:
        return triton_channel_moments_backward(grad_mean, grad_var, x, mean)

    @torch.library.custom_op("madfast::bn_stat_losses_triton", mutates_args=())
    def _bn_stat_losses_triton(xs: list[torch.Tensor], running_means: list[torch.Tensor],
                               running_vars: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return triton_bn_stat_losses(xs, running_means, running_vars)

    @torch.library.custom_op("madfast::bn_stat_losses_backward_triton", mutates_args=())
    def _bn_stat_losses_backward_triton(grad: torch.Tensor, xs: list[torch.Tensor], running_means: list[torch.Tensor],
                                        running_vars: list[torch.Tensor], moments: torch.Tensor,
                                        norms: torch.Tensor) -> list[torch.Tensor]:
        return triton_bn_stat_losses_backward(grad, xs, running_means, running_vars, moments, norms)


register("channel_moments", fake=_fake_moments, backward_fake=_fake_moments_backward, setup_context=_moments_setup,
         backward=_moments_backward)
# autograd: _BnStatLosses below, not register_autograd (whose wrapper costs µs per list element even
# under no_grad)
register("bn_stat_losses", fake=_fake_bn_losses, backward_fake=_fake_bn_losses_backward)


def channel_moments(x: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (N, C, H, W) over (N, H, W), differentiable;
    (C,) each, fp32 (fp64 for fp64)."""
    check_floating("channel_moments", "x", x, ndim=4)
    chosen = _backend.choose("channel_moments", backend, x.device, x.dtype)
    if chosen == "torch":
        return torch_channel_moments(x)
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
    return bn_stat_losses([x], [running_mean], [running_var], backend=backend).to(x.dtype)


# the multi-layer ops of each backend, asked once (no dispatcher query under compile)
_MULTI_LAYER = {backend: (getattr(torch.ops.madfast, fwd), getattr(torch.ops.madfast, bwd))
                for backend, (fwd, bwd) in _backend.OPS["bn_stat_losses"].kernels.items() if present(fwd)}


class _BnStatLosses(torch.autograd.Function):
    """A backend's bn_stat_losses op with its backward op. A plain Function: torch.library's autograd
    wrapper walks list arguments with pytree, ~2 µs per tensor on a CPU core, three tensors per layer."""

    @staticmethod
    def forward(ctx, ops: tuple, n: int, *tensors: torch.Tensor) -> torch.Tensor:
        loss, moments, norms = ops[0](tensors[:n], tensors[n:2 * n], tensors[2 * n:])
        ctx.n, ctx.backward_op = n, ops[1]
        ctx.mark_non_differentiable(moments, norms)
        ctx.save_for_backward(*tensors, moments, norms)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved, n = ctx.saved_tensors, ctx.n
        grads = ctx.backward_op(grad, saved[:n], saved[n:2 * n], saved[2 * n:3 * n], saved[-2], saved[-1])
        return (None, None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[2:n + 2]))) + \
            (None,) * (2 * n)


def bn_stat_losses(xs: list[torch.Tensor], running_means: list[torch.Tensor], running_vars: list[torch.Tensor], *,
                   backend: str = "auto") -> torch.Tensor:
    """Σ over layers of ``bn_stat_loss(x, running_mean, running_var)``, many layers in one call.

    Args:
        xs: BN inputs (N, C_l, H, W), on one device (validated by the kernel, which names the
            offending ``x[l]``: the per-layer Python checks are what this call saves).
        running_means, running_vars: (C_l,) each, as many as xs.
        backend: "auto", "torch", "triton", "cuda" or "cpp"; on all but "torch" one op for every
            layer (CUDA: 3 launches forward, 1 backward, up to 24 layers of a dtype per launch;
            Triton: the same, up to 32 layers of a dtype and layout per launch).
    Returns:
        A 0-d tensor, fp32 (fp64 when an x is fp64), differentiable w.r.t. every x.
    """
    check_lengths(xs, running_means, running_vars, "bn_stat_losses")
    chosen = _backend.choose("bn_stat_losses", backend, xs[0].device)
    if chosen != "torch":
        return _BnStatLosses.apply(_MULTI_LAYER[chosen], len(xs), *xs, *running_means, *running_vars)
    acc = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    total = None
    for x, rm, rv in zip(xs, running_means, running_vars, strict=True):
        loss = torch_bn_stat_loss(x.to(acc), rm, rv)
        total = loss if total is None else total + loss
    return total

