"""benchmarks/triton_compiles.py counts what a command compiles on a GPU: one compile per Triton JIT
key (dtypes and constexprs apart), each autotune config of a key apart, and nothing for what does not
run Triton."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("launch", [True, False], ids=["launched", "no-launch"])
def test_compiles_of_a_headline_check(tmp_path, launch):
    from madfast.ops.upsample_conv.triton_kernel import forward_configs
    import torch

    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_compiles.py"), "--json", str(tmp_path / "n.json"),
           *([] if launch else ["--no-launch"]), "--", "check", "--device", "cpu", "--quick", "--headline",
           "--ops", "ema,upsample_conv", "--dtypes", "fp32,bf16", "--no-timing", "--out", str(tmp_path / "c"),
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads((tmp_path / "n.json").read_text())
    # per dtype: one EMA group, the block's forward once per config, each gradient once
    fwd = len(forward_configs(torch.float32)) + len(forward_configs(torch.bfloat16))
    assert counts == {"_ema_multi_tensor_kernel": 2, "_upsample_conv_fwd_kernel": fwd,
                      "_upsample_conv_grad_input_kernel": 2, "_upsample_conv_grad_weight_kernel": 2}
    assert f"{sum(counts.values()):5d}  Triton compiles in all" in proc.stdout
    if launch:  # the kernels ran: the check's rows passed
        report = json.loads((tmp_path / "c" / "check.json").read_text())
        assert report["summary"]["failures"] == 0
