"""What a result was measured on: versions, commit, CPU and GPU. Every results file (`madfast check`,
`madfast bench step`, the pytest-benchmark suites) records this one dict."""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["environment"]


def _run(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    root = str(Path(__file__).resolve().parents[2])
    sha = _run("git", "-C", root, "rev-parse", "HEAD")
    if not sha:
        return None
    return sha + ("+dirty" if _run("git", "-C", root, "status", "--porcelain", "--untracked-files=no") else "")


def environment(device: torch.device) -> dict:
    import madfast
    from madfast import _backend, _verified

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "madfast": madfast.__version__, "commit": _git_commit(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "platform": platform.platform(),
        "triton": __import__("triton").__version__ if importlib.util.find_spec("triton") else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "extension_loaded": _backend.extension_loaded(), "device": device.type,
        "madfast_backend": os.environ.get("MADFAST_BACKEND") or None,  # a run-wide backend changes every op
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        env.update(gpu=props.name, capability=_verified.capability_of(device), sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), driver=driver.splitlines()[0] if driver else None)
    return env
