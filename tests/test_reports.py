"""Reports never fail a run: the sample grid stays small at 1000 classes, G runs in chunks, and a
failing figure is a warning after summary.json and the final checkpoint are written."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from madfast.models import Generator
from madfast.train import distill
from madfast.train import loop as loop_module
from madfast.train.checkpoint import latest_checkpoint
from madfast.train.report import grid_classes, save_sample_grid
from mad_helpers import tiny_config, tiny_teacher


def test_grid_classes_are_at_most_16_evenly_spread():
    assert grid_classes(10).tolist() == list(range(10))
    assert grid_classes(16).tolist() == list(range(16))
    picked = grid_classes(1000).tolist()
    assert len(picked) == 16 and picked[0] == 0 and picked[-1] == 999
    gaps = {b - a for a, b in zip(picked, picked[1:])}
    assert gaps <= {66, 67}, gaps  # 999 / 15 = 66.6


def test_sample_grid_at_1000_classes_is_16_rows_in_chunks(tmp_path):
    torch.manual_seed(0)
    gens = [Generator(8, 1000, 16, 3, 4) for _ in range(2)]
    sizes = []
    for g in gens:
        g.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    task = SimpleNamespace(g_raw=gens[0], ema=SimpleNamespace(module=gens[1]), cfg=SimpleNamespace(nz=8, gen_output="tanh"),
                           device=torch.device("cpu"))
    state = [t.clone() for t in gens[0].state_dict().values()]
    save_sample_grid(task, str(tmp_path / "s.png"), per_class=4, chunk=24)
    img = Image.open(tmp_path / "s.png")
    # make_grid, padding 1: 16 rows of 16 px, 8 columns (4 of G, 4 of G̃)
    assert img.size == (8 * 17 + 1, 16 * 17 + 1)
    assert max(sizes) <= 24 and sum(sizes) == 2 * 64
    assert all(torch.equal(a, b) for a, b in zip(state, gens[0].state_dict().values()))  # run's G untouched
    # the first row is class 0: G's first cell is G(z_0, 0) from the fixed seed, in the same chunk
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    y = grid_classes(1000).repeat_interleave(4)
    with torch.no_grad():
        cell = (gens[0].train()(z[:24], y[:24])[0] + 1) / 2
    pixels = pil_to_tensor(img).float() / 255
    torch.testing.assert_close(pixels[:, 1:17, 1:17], cell, atol=1 / 255 + 1e-6, rtol=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("teacher"))


def test_failing_figures_warn_after_summary_and_checkpoint(teacher, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (planted)")

    monkeypatch.setattr(loop_module, "save_sample_grid", boom)
    monkeypatch.setattr(loop_module, "save_curves", lambda *a: (_ for _ in ()).throw(ValueError("too tall")))
    with pytest.warns(RuntimeWarning) as caught:
        s = distill(tiny_config(teacher, tmp_path))
    messages = [str(w.message) for w in caught]
    assert any("could not write samples.png: OutOfMemoryError" in m for m in messages), messages
    assert any("could not write curves.png: ValueError: too tall" in m for m in messages), messages
    assert s["finished"] and json.load(open(tmp_path / "summary.json"))["step"] == 6
    assert latest_checkpoint(str(tmp_path)).endswith("ckpt-00000006.pt")
    assert not os.path.exists(tmp_path / "samples.png")
