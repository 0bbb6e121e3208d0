"""CMakeLists.txt builds csrc/ against libtorch into a library torch.ops.load_library can load."""

import glob
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.utils
from torch.utils.cpp_extension import CUDA_HOME

ROOT = Path(__file__).resolve().parents[1]


def _cmake() -> str | None:
    local = Path(sys.executable).with_name("cmake")  # the test extra installs it into the venv
    return str(local) if local.exists() else shutil.which("cmake")


def _cuda_hints() -> list[str]:
    """A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit and nvrtc."""
    if torch.version.cuda is None:
        return []
    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else CUDA_HOME)
    hints = [f"-DCUDA_TOOLKIT_ROOT_DIR={home}"] if home else []
    site = Path(torch.__file__).parents[1]
    nvrtc = sorted(glob.glob(f"{home}/lib64/libnvrtc.so*")) + sorted(glob.glob(str(site / "nvidia/*/lib/libnvrtc.so*")))
    nvrtc = [p for p in nvrtc if "builtins" not in p and ".alt." not in p]
    return hints + ([f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}"] if nvrtc else [])


@pytest.mark.slow
@pytest.mark.skipif(_cmake() is None, reason="cmake is not installed")
def test_cmake_build_loads_and_runs(tmp_path):
    build = tmp_path / "build"
    configure = [_cmake(), "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", *_cuda_hints()]
    for cmd in (configure, [_cmake(), "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    (lib,) = build.glob("libmadfast_ops.*")
    # A fresh interpreter: madfast._C registers the same op names in this one.
    code = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(lib)!r})
        ema, cur = [torch.zeros(5), torch.zeros(2, 3, dtype=torch.bfloat16)], [torch.ones(5), torch.ones(2, 3, dtype=torch.bfloat16)]
        torch.ops.madfast.ema_update_(ema, cur, torch.tensor(0.75))
        assert torch.equal(ema[0], torch.full((5,), 0.25)) and torch.equal(ema[1], torch.full((2, 3), 0.25, dtype=torch.bfloat16))
        s, t = torch.randn(3, 7), torch.randn(3, 7)
        rows, stats, total = torch.ops.madfast.kl_div_fwd(s, t, 2.0, "none", 1.0, None)
        ref = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.log_softmax(t / 2, 1), reduction="none",
                                         log_target=True).sum(1) * 4
        gs, gt = torch.ops.madfast.kl_div_bwd(torch.ones(3), s, t, stats, total, 2.0, "none", 1.0, None, True, False)
        assert torch.allclose(rows, ref, atol=1e-5) and gs.shape == (3, 7) and gt.numel() == 0
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
