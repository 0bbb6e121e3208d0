"""Preemption: a scheduler's SIGTERM (SLURM, Kubernetes, torchrun's agent) or SIGUSR1 stops the run
after the current iteration, with one checkpoint; a second signal stops it at once.

Every rank must stop after the same iteration (the checkpoint is a collective), so under torchrun
the ranks agree on the flag after each iteration: one all-reduce of one CPU int over gloo — no
device sync. A second signal raises ``Preempted`` wherever the process is: a checkpoint being
written is then abandoned before its rename (the newest complete one stays the newest).
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from madfast.errors import EXIT_PREEMPTED
from madfast.train.distributed import DistContext

__all__ = ["EXIT_PREEMPTED", "SIGNALS", "Preempted", "PreemptionGuard"]

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(BaseException):
    """A second preemption signal: leave now (BaseException, so that no ``except Exception`` keeps going)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}")
        self.signum = signum


class PreemptionGuard:
    """Between ``install()`` and ``restore()``: records the first SIGTERM/SIGUSR1; ``should_stop()``
    after each iteration says whether any rank received one. Handlers are installed only in the main
    thread (Python's rule); ``restore()`` puts the previous ones back."""

    def __init__(self, ctx: DistContext):
        self.signum, self._previous, self._group = None, {}, None
        if ctx.distributed:
            # NCCL would make the flag a device tensor (a sync per iteration): a gloo group instead
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self._flag = torch.zeros(1, dtype=torch.int32)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Preempted(signum)
        self.signum = signum

    def install(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def should_stop(self) -> bool:
        """True on every rank once any rank has been signalled (then ``self.signum`` is set everywhere)."""
        if self._group is None:
            return self.signum is not None
        self._flag.fill_(self.signum or 0)
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        got = int(self._flag.numpy()[0])  # a CPU tensor: no device sync
        if got and self.signum is None:
            self.signum = got
        return bool(got)

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None
