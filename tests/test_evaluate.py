"""Sharded evaluation: disjoint shards covering every image once, counts against a formula written
here, and an ImageFolder listed once and rebuilt elsewhere without a scan."""

import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from madfast.data import Normalize, build_dataset, folder_index
from madfast.train.distributed import DistContext
from madfast.train.evaluate import ShardSampler, eval_loader, evaluate
from test_data import make_image_folder


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (2, 4), (0, 2)])
def test_shards_cover_every_index_once(n, world):
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardSampler(n, r, world)) for r in range(world)] == [len(s) for s in shards]


def _data(n=37, classes=9):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 2, 2, generator=g), torch.randint(0, classes, (n,), generator=g))


def test_counts_match_a_formula_and_shards_add_up():
    ds = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 9))
    norm = Normalize((0.5,), (0.25,))
    x, y = ds.tensors
    with torch.no_grad():
        logits = model((x - 0.5) / 0.25).double()
    rank_of_label = (logits > logits.gather(1, y[:, None])).sum(1)  # 0: top-1
    want1, want5 = 100.0 * (rank_of_label == 0).double().mean().item(), 100.0 * (rank_of_label < 5).double().mean().item()
    full = evaluate(model, eval_loader(ds, 5, 0), norm, torch.device("cpu"))
    assert full["acc"] == pytest.approx(want1) and full["acc5"] == pytest.approx(want5)
    assert 0 < want1 < want5 < 100  # the data discriminates top-1 from top-5
    # two ranks' shards, each evaluated alone, weighted by their sizes: the same accuracy
    parts = [(len(ShardSampler(len(ds), r, 2)),
              evaluate(model, eval_loader(ds, 4, 0, DistContext(r, 2)), norm, torch.device("cpu"))["acc"])
             for r in range(2)]
    assert sum(n * a for n, a in parts) / len(ds) == pytest.approx(want1)
    assert model.training  # mode restored


def test_folder_listed_once_is_rebuilt_without_a_scan(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=3)
    first = build_dataset("imagefolder", "test", data, 16)
    index = folder_index(first)
    os.remove(first.samples[0][0])  # a scan would no longer list it
    again = build_dataset("imagefolder", "test", data, 16, index=index)
    assert again.samples == first.samples and again.classes == first.classes == ["bright", "dark"]
    assert again[1][0].shape == (3, 16, 16) and again[1][1] == first.samples[1][1]
    assert folder_index(build_dataset("digits", "test")) is None
