"""Top-1 / top-5 accuracy of a classifier on a data set of [0, 1] images."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["evaluate", "eval_loader"]


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    # Its own generator: iterating never draws from the global RNG, so evaluation cannot change training.
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      generator=torch.Generator())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, normalize: nn.Module, device: torch.device,
             channels_last: bool = False) -> dict[str, float]:
    """{"acc": top-1 %, "acc5": top-5 %} with ``model`` in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    normalize = normalize.to(device)
    correct1 = correct5 = total = 0
    for x, y in loader:
        x, y = normalize(x.to(device)), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        total += y.numel()
    model.train(was_training)
    return {"acc": 100.0 * correct1 / max(total, 1), "acc5": 100.0 * correct5 / max(total, 1)}
