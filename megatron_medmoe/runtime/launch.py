"""Start the local worker processes a layout needs, when `medmoe` runs outside any launcher.

Each worker is `python -m megatron_medmoe <same arguments>` with torchrun-style variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so it joins exactly as under torchrun. Stop signals sent
to this parent (SIGINT, SIGTERM, SIGUSR1, SIGHUP) are forwarded to every worker; if a worker fails, the
others are stopped. Each worker leads its own process group, and whatever is left of a group when the job
ends (helper processes of a rank that was killed, e.g. checkpoint writers, which would hold the job's output
pipes open) is killed with it. Workers hold a lifeline to this parent (runtime/lifeline.py): if the parent
dies, even by SIGKILL, each worker kills its group.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, List, Optional, Sequence

from .exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_REQUEUE
from .lifeline import LIFELINE_ENV, open_lifeline

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world_size: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # CPU: share the cores instead of every worker spawning one thread per core
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what remains of a worker's process group (nothing, after a clean exit)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_local_workers(argv: Sequence[str], world_size: int, grace_seconds: float = 30.0, pass_fds: Sequence[int] = (),
                      on_signal: Optional[Callable[[int], None]] = None) -> int:
    """Run `python -m megatron_medmoe *argv` as `world_size` ranks; return the job's exit code.

    A worker that exits with an error makes the others stop after `grace_seconds` (they would wait for it
    in a collective forever); EXIT_REQUEUE is not an error: ranks stopping on a signal exit with it, and so
    does the job when it was asked to stop and its workers died of a signal. `pass_fds` are shared with
    every worker (a run's directory locks); `on_signal` hears every stop signal this parent receives."""
    port = free_port()
    read_fd, write_fd = open_lifeline()
    procs: List[subprocess.Popen] = []
    try:
        for r in range(world_size):
            env = worker_env(r, world_size, port)
            env[LIFELINE_ENV] = str(read_fd)
            procs.append(subprocess.Popen([sys.executable, "-m", "megatron_medmoe", *argv], env=env,
                                          process_group=0, pass_fds=(read_fd, *pass_fds)))
    except BaseException:
        os.close(write_fd)
        for p in procs:
            _kill_group(p)
        raise
    finally:
        os.close(read_fd)
    stopping: List[int] = []

    def forward(signum, _frame):
        if on_signal is not None:
            on_signal(signum)
        stopping.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS
                if signal.getsignal(s) is not signal.SIG_IGN}  # ignored stays ignored (SIGHUP under nohup)
    try:
        failed_at = None
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            if failed_at is None and any(c not in (None, EXIT_OK, EXIT_REQUEUE) for c in codes):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_seconds:
                for p in procs:  # a rank died: the others would wait on it in a collective forever
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            _kill_group(p)
        os.close(write_fd)
    codes = [p.returncode for p in procs]
    failures = [c for c in codes if c not in (EXIT_OK, EXIT_REQUEUE)]
    if not failures:
        return EXIT_REQUEUE if EXIT_REQUEUE in codes or stopping else EXIT_OK
    # the first rank that failed on its own account (not killed by us) tells what happened
    own = [c for c in failures if c > 0]
    if not own and stopping:  # asked to stop, and killed before it could save: resume from the last checkpoint
        return EXIT_REQUEUE
    return own[0] if own else EXIT_FAILURE
