"""`pip install madfast` (no extras) gives the ops and madfast.nn; what needs the [train] extra says
so in one line. Run in a fresh interpreter where the extra's packages cannot be imported."""

import subprocess
import sys

import pytest

TRAIN_EXTRA = ["torchvision", "sklearn", "tqdm", "tensorboard", "yaml", "matplotlib"]

# None in sys.modules makes `import name` (and of its submodules) raise ModuleNotFoundError.
_BLOCK = f"import sys\nfor name in {TRAIN_EXTRA!r}:\n    sys.modules[name] = None\n"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK + code], capture_output=True, text=True, timeout=300)


def test_ops_and_nn_without_the_train_extra():
    r = _python("""
import torch, madfast
from torch import nn
model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
ema = madfast.FusedEMA(model, decay=0.5)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
ema.update(model)
w = dict(model.named_parameters())["0.weight"]
assert torch.allclose(ema.module[0].weight, w - 0.5), "EMA update"
s, t = torch.randn(4, 5), torch.randn(4, 5)
kl = madfast.ops.kl_div(s, t)
want = torch.nn.functional.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean")
assert torch.allclose(kl, want, atol=1e-6), (kl, want)
madfast.nn.UpsampleConvBlock(4, 2)(torch.randn(2, 4, 3, 3)).sum().backward()
for name in %r:
    assert sys.modules[name] is None, name
print("ok")
""" % TRAIN_EXTRA)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("argv,needs", [
    (["demo", "--no-progress", "--out", "{tmp}/demo"], "needs scikit-learn"),
    (["distill", "--dataset", "cifar10", "--data-dir", "{tmp}", "--print-config"], "needs pyyaml"),
])
def test_cli_without_the_train_extra_names_it_in_one_line(tmp_path, argv, needs):
    argv = [a.format(tmp=tmp_path) for a in argv]
    r = _python(f"from madfast.cli import main\nraise SystemExit(main({argv!r}))")
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and needs in err and "pip install 'madfast[train]'" in err, err
