"""torchrun support: process group from the environment, DDP wrapping, rank-0 helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from madfast.errors import UsageError

__all__ = ["DistContext", "setup", "teardown", "wrap", "broadcast_buffers", "assert_identical", "gather"]


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(request: str, local_rank: int) -> torch.device:
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {request}: CUDA is not available on this machine")
        return torch.device(request if ":" in request else f"cuda:{local_rank}")
    if request != "cpu":
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {request!r}")
    return torch.device("cpu")


def setup(device: str = "auto") -> DistContext:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world == 1:
        return DistContext(0, 1, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        _join("nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev)


def _join(backend: str) -> None:
    """init_process_group from torchrun's environment, its store keys under this restart's own prefix:
    a worker restarted by ``torchrun --max-restarts`` shares the agent's store with the attempt before
    it, and would otherwise read a dead peer's address (gloo: "connectFullMesh ... Connection refused")."""
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"madfast/attempt-{attempt}", store),
                            rank=rank, world_size=world)


def teardown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel around ``module`` when there are several ranks, else ``module``."""
    if not ctx.distributed:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


@torch.no_grad()
def broadcast_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Rank 0's buffers everywhere (BN running statistics drift apart between DDP forwards): one
    broadcast per dtype (buffers flattened), not one per buffer."""
    if not ctx.distributed:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in module.buffers():
        groups.setdefault(b.dtype, []).append(b)
    for bufs in groups.values():
        flat = _flatten_dense_tensors(bufs)
        dist.broadcast(flat, 0)
        for b, v in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
            b.copy_(v)


@torch.no_grad()
def assert_identical(module: nn.Module, ctx: DistContext, what: str) -> None:
    """Raises when ``module``'s parameters and buffers differ between ranks."""
    if not ctx.distributed:
        return
    flat = torch.cat([t.detach().double().flatten() for t in (*module.parameters(), *module.buffers())])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, dist.ReduceOp.MIN)
    dist.all_reduce(hi, dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"{what} differs between ranks (max difference {(hi - lo).max().item():.3g})")


def gather(obj, ctx: DistContext) -> list:
    """Every rank's ``obj``, in rank order (a one-element list without torchrun)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
