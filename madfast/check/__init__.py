"""`madfast check`: every kernel verified and timed on the machine it runs on (see runner.py), and the
verified-dispatch entries that let ``auto`` use only what was verified (madfast._verified)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from madfast.check.cases import OP_NAMES
from madfast.check.runner import CheckOptions, run_check

__all__ = ["CheckOptions", "run_check", "options", "OP_NAMES", "DTYPE_NAMES"]

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def _names(flag: str, text: str | None, known) -> list[str]:
    if text is None:
        return list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"{flag}: unknown name(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(known)}")
    return names


def _writable_dir(out: str) -> Path:
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"--out {out!r} is not a writable folder ({e.strerror or e})") from None
    return path


def options(device: str, ops: str | None, dtypes: str | None, out: str, quick: bool, compile: bool | None,
            save: bool, time_budget: float | None, progress: bool, argv: list[str], headline: bool = False,
            timing: bool = True) -> CheckOptions:
    """Validated options; ValueError (one line, naming the flag) before anything is written or run."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch here (use --device cpu)")
    op_names = _names("--ops", ops, OP_NAMES)
    dtype_list = list(dict.fromkeys(DTYPE_NAMES[n] for n in _names("--dtypes", dtypes, tuple(DTYPE_NAMES))))
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"--time-budget must be > 0 seconds, got {time_budget}")
    if save:
        if not timing:
            raise ValueError("--save needs the timings that --no-timing skips")
        if device != "cuda":
            raise ValueError("--save: verified dispatch applies to CUDA GPUs; run with --device cuda")
        from madfast import _verified
        _verified.read_entries(_verified.cache_file())  # a corrupt cache stops here, untouched
    dev = torch.device(device)
    return CheckOptions(device=dev, ops=tuple(op_names), dtypes=tuple(dtype_list), out=_writable_dir(out),
                        quick=quick, headline=headline, timing=timing,
                        compile=(not quick) if compile is None else compile, save=save,
                        time_budget_s=time_budget, progress=progress,
                        batch_divisor=1 if device == "cuda" else 8, argv=argv)

