"""Stopping well: a signal on any rank, or the wall-clock limit, stops every rank at the same step.

SIGTERM (preemption, scancel), SIGUSR1 (Slurm's warning before the time limit, `--signal=USR1@90`), SIGINT
(Ctrl-C, forwarded by the launcher) and SIGHUP (a closed terminal or ssh session) set a flag in the process
that receives them. The handler is installed when `medmoe train` starts, before anything slow, so a signal
during start-up (imports, building the model, loading a checkpoint, building the data order) is kept, not
fatal. Every step ends with one all-reduce of the flags (and of the wall-clock check), the first one before
step 1, so all ranks agree on the step after which they save and exit with EXIT_REQUEUE.
"""
from __future__ import annotations

import signal
import time
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


class StopRequest:
    def __init__(self, max_wall_minutes: Optional[float] = None):
        self.deadline: Optional[float] = None
        self.set_wall_limit(max_wall_minutes)
        self.received: Optional[str] = None
        self._previous = {}

    def set_wall_limit(self, max_wall_minutes: Optional[float]) -> None:
        """The limit counts from now, the first step (so a slow start-up cannot use it up before any step)."""
        self.deadline = None if max_wall_minutes is None else time.monotonic() + 60.0 * max_wall_minutes

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:  # e.g. SIGHUP under nohup: the user asked to go on
                continue
            self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def handle(self, signum, _frame=None) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, signals_only: bool = False) -> Optional[str]:
        """Collective: why every rank stops now (signal or wall clock), or None to go on."""
        import torch
        import torch.distributed as dist

        from ..runtime.distributed import collective_device

        local = 0
        if self.received is not None:
            local = 2
        elif not signals_only and self.deadline is not None and time.monotonic() >= self.deadline:
            local = 1
        flag = torch.tensor([local], dtype=torch.int32, device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return {0: None, 1: "the wall-clock limit", 2: "a stop signal"}[int(flag.item())]


_PROCESS: Optional[StopRequest] = None


def process_stop_request() -> StopRequest:
    """This process's stop request, its handler installed on first use (`medmoe train` does it first thing)."""
    global _PROCESS
    if _PROCESS is None:
        _PROCESS = StopRequest().install()
    return _PROCESS
