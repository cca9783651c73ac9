"""One run per directory: a run holds an exclusive lock on its save and output directories while it writes.

The lock is an flock on DIR/.medmoe-run.lock, which also names its holder (host, pid, start time, command).
The kernel (or the file server) drops it when the holder's last process ends, however it ends, so a lock
left by a dead run is simply taken over; the file then still names the dead holder, which is reported.
`medmoe train` run directly holds it in the launcher and hands the open lock to its workers, so it lasts
as long as any of them lives; under torchrun, srun or mpirun rank 0 holds it. A requeued Slurm job (same
job id) waits a while for its earlier incarnation's lock, which a file server may release late.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

LOCK_NAME = ".medmoe-run.lock"
REQUEUE_WAIT_SECONDS = 180.0


class RunLockError(RuntimeError):
    """Another run holds the directory."""


def _holder() -> Dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["medmoe", *sys.argv[1:]])[:500],
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT")}


def _read(fd: int) -> Optional[dict]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace")
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "a run that did not say who it is"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')} ({holder.get('command')})"


def _earlier_incarnation(holder: Optional[dict]) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    return bool(job and holder and holder.get("slurm_job") == job
                and holder.get("slurm_restart") != os.environ.get("SLURM_RESTART_COUNT"))


class RunLock:
    """The locks of one run's directories; `fds` can be handed to child processes (pass_fds)."""

    def __init__(self):
        self.fds: List[int] = []
        self.took_over: List[str] = []  # what stale holders were replaced, for the log
        self.unlocked: List[str] = []  # directories whose file system refuses locks

    def acquire(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        waited_until = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read(fd)
                if _earlier_incarnation(holder):
                    waited_until = waited_until or time.monotonic() + REQUEUE_WAIT_SECONDS
                    if time.monotonic() < waited_until:
                        time.sleep(2.0)
                        continue
                os.close(fd)
                raise RunLockError(f"{directory} is in use by another run: {describe(holder)}. Wait for it to end "
                                   f"or stop it; two runs writing one directory would corrupt it ({path})")
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                os.close(fd)  # e.g. Lustre mounted without flock: warn, the run itself works
                self.unlocked.append(directory)
                return
        stale = _read(fd)
        if stale:
            self.took_over.append(f"{directory}: {describe(stale)}")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_holder()) + "\n").encode())
        os.set_inheritable(fd, True)
        self.fds.append(fd)

    def release(self) -> None:
        for fd in self.fds:
            try:
                os.ftruncate(fd, 0)  # a clean end leaves no holder behind
            except OSError:
                pass
            os.close(fd)
        self.fds.clear()

    def report(self) -> List[str]:
        lines = [f"took over the lock left by a run that ended without releasing it, {what}" for what in self.took_over]
        lines += [f"warning: {d} is on a file system without locks (flock): nothing stops a second run from "
                  "writing there at the same time" for d in self.unlocked]
        return lines


def lock_directories(directories: Sequence[Optional[str]]) -> RunLock:
    """Lock every distinct directory given (None skipped), or raise RunLockError having locked none."""
    lock = RunLock()
    seen = set()
    try:
        for directory in directories:
            if directory and os.path.realpath(directory) not in seen:
                seen.add(os.path.realpath(directory))
                lock.acquire(directory)
    except BaseException:
        lock.release()
        raise
    return lock
