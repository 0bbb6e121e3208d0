"""--sync-bn: batch statistics over every rank's samples, not 1/world of them.

G's BatchNorm layers become ``nn.SyncBatchNorm`` (CUDA/NCCL; torch's SyncBatchNorm has no CPU
kernel, so on CPU/gloo G keeps per-rank statistics). The teacher's BN prior is computed from
all-reduced moments on any device (``GlobalBNStatHook``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from madfast.nn import BNStatHook
from madfast.ops._dtypes import acc_dtype

__all__ = ["GlobalBNStatHook", "sync_generator_bn"]


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks, differentiable: the gradient of every rank's copy of the sum is all-reduced
    too (as the deprecated torch.distributed.nn.functional.all_reduce does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    backward = forward  # the gradient of a sum over ranks: the sum of every rank's gradient


class GlobalBNStatHook(BNStatHook):
    """BNStatHook whose per-layer moments are summed over all ranks before the prior:
    ‖μ − running_mean‖₂ + ‖σ² − running_var‖₂ with μ, σ² (biased) of the global batch. The
    all-reduce is differentiable, so each rank's G receives the gradient of the global loss
    (after DDP's average)."""

    def _record(self, bn: nn.BatchNorm2d, args) -> None:
        if not self.enabled:
            return
        x = args[0].to(acc_dtype(args[0].dtype))  # fp32 sums for bf16/fp16, fp64 stays fp64
        # Sums of x − running_mean (the same on every rank): one all-reduce, and no cancellation in
        # E[d²] − E[d]² while the batch mean is near the running mean, where the prior drives it.
        shift = bn.running_mean.to(x.dtype).view(1, -1, 1, 1)
        d = x - shift
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([d.sum((0, 2, 3)), (d * d).sum((0, 2, 3)), count]))
        c = x.shape[1]
        n = sums[2 * c]
        mean_d = sums[:c] / n  # μ − running_mean
        var = sums[c:2 * c] / n - mean_d * mean_d
        self._losses.append(torch.linalg.vector_norm(mean_d)
                            + torch.linalg.vector_norm(var - bn.running_var.to(x.dtype)))


def sync_generator_bn(generator: nn.Module, device: torch.device) -> nn.Module:
    """G with SyncBatchNorm layers on CUDA; unchanged elsewhere (no CPU SyncBatchNorm in torch)."""
    if device.type != "cuda":
        return generator
    return nn.SyncBatchNorm.convert_sync_batchnorm(generator)
