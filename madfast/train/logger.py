"""Rank-0 run logging: metrics.csv (one row per logged step) and TensorBoard scalars."""

from __future__ import annotations

import csv
import os

from madfast._extras import require

__all__ = ["RunLogger", "read_metrics"]


class RunLogger:
    """Appends rows of ``columns`` to OUT/metrics.csv. On resume, rows past ``start_step`` (logged
    after the checkpoint the run resumes from) are dropped, so the file reads as one run."""

    def __init__(self, out: str, columns: list[str], tensorboard: bool, start_step: int = 0):
        self.path = os.path.join(out, "metrics.csv")
        self.columns = ["step", *columns]
        kept = [r for r in read_metrics(self.path) if int(r["step"]) <= start_step] if start_step else []
        self._file = open(self.path, "w", newline="")
        self._csv = csv.DictWriter(self._file, self.columns, extrasaction="ignore")
        self._csv.writeheader()
        self._csv.writerows(kept)
        self._tb = None
        if tensorboard:
            require("tensorboard", "TensorBoard logging (--no-tensorboard turns it off)")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(out, "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._csv.writerow({"step": step, **values})
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
