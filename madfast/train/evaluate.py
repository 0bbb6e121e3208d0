"""Top-1 / top-5 accuracy of a classifier on a data set of [0, 1] images, sharded over ranks.

Each rank evaluates its own shard (every image exactly once: no sampler padding), counts stay on
the device, and one all-reduce plus one host read end the evaluation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from madfast.train.distributed import DistContext

__all__ = ["evaluate", "eval_loader", "ShardSampler"]


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, … of ``n``: disjoint shards covering every index once.
    (DistributedSampler pads with repeats so that shards are equal; those would be counted twice.)"""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, ctx: DistContext | None = None) -> DataLoader:
    """This rank's shard of ``dataset`` in order; batch_size is per rank."""
    ctx = ctx or DistContext()
    cuda = ctx.device.type == "cuda"
    # Its own generator: iterating never draws from the global RNG, so evaluation cannot change training.
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), ctx.rank, ctx.world_size),
                      num_workers=num_workers, pin_memory=cuda, persistent_workers=num_workers > 0,
                      generator=torch.Generator())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, normalize: nn.Module, device: torch.device,
             channels_last: bool = False, ctx: DistContext | None = None,
             amp: torch.dtype | None = None) -> dict[str, float]:
    """{"acc": top-1 %, "acc5": top-5 %} over every rank's shard, with ``model`` in eval mode (its
    mode is restored) and autocast in ``amp`` when given. Every rank gets the same numbers."""
    was_training = model.training
    model.eval()
    normalize = normalize.to(device)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5, images
    images = 0  # known on the host from the shapes: no device read
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with autocast:
        for x, y in loader:
            x = normalize(x.to(device, non_blocking=True))
            y = y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            counts[0] += (top[:, 0] == y).sum()
            counts[1] += (top == y[:, None]).any(1).sum()
            images += y.numel()
    counts[2] = images
    if ctx is not None and ctx.distributed:
        dist.all_reduce(counts)
    model.train(was_training)
    c1, c5, total = counts.tolist()  # the evaluation's one host sync
    return {"acc": 100.0 * c1 / max(total, 1), "acc5": 100.0 * c5 / max(total, 1)}
