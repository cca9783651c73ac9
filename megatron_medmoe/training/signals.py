"""Stopping well: a signal on any rank, or the wall-clock limit, stops every rank at the same step.

SIGTERM (preemption, scancel) and SIGUSR1 (Slurm's warning before the time limit, `--signal=USR1@90`) set a
flag in the rank that receives them. Every step ends with one all-reduce of the flags (and of the
wall-clock check), so all ranks agree on the step after which they save and exit with EXIT_REQUEUE.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..runtime.distributed import collective_device

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, max_wall_minutes: Optional[float]):
        self.started = time.monotonic()
        self.deadline = None if max_wall_minutes is None else self.started + 60.0 * max_wall_minutes
        self.received: Optional[str] = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self) -> Optional[str]:
        """Collective: why every rank stops now (signal or wall clock), or None to go on."""
        local = 0
        if self.received is not None:
            local = 2
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            local = 1
        flag = torch.tensor([local], dtype=torch.int32, device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return {0: None, 1: "the wall-clock limit", 2: "a stop signal"}[int(flag.item())]
