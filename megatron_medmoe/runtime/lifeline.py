"""Child processes that die with the process that started them.

Two mechanisms, because neither covers every case alone:
- the parent-death signal (Linux prctl PR_SET_PDEATHSIG): the kernel signals a child the moment its parent
  exits, however it exits (SIGKILL included). Right for leaf workers (tokenizer processes).
- a lifeline pipe: the parent keeps the write end, the child a read end, and a thread in the child waits on
  it; end of file means the parent is gone, and the child kills its whole process group. Right for training
  ranks, which have children of their own (megatron-core's checkpoint writers): a parent-death SIGKILL would
  kill the rank alone and leave those behind.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
from typing import MutableMapping, Optional

LIFELINE_ENV = "MEDMOE_LIFELINE_FD"
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits. False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """For a child that has no children of its own (a pool worker initializer, say)."""
    set_parent_death_signal(sig)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)


def open_lifeline() -> tuple:
    """(read_fd, write_fd): pass read_fd to the children (pass_fds, and its number in LIFELINE_ENV), keep
    write_fd open in the parent for as long as the children may live."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(read_fd, True)
    return read_fd, write_fd


def watch_lifeline(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """In a child started with a lifeline: start the thread that kills this process group when the parent is
    gone. False when there is no lifeline (run by torchrun, srun or by hand)."""
    env = os.environ if environ is None else environ
    value = env.pop(LIFELINE_ENV, None)  # this process's alone: its own children get no lifeline from it
    if not value:
        return False
    try:
        fd = int(value)
        os.fstat(fd)
    except (ValueError, OSError):  # not a pipe we were handed (a stray variable): nothing to watch
        return False

    def wait_for_parent() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        if os.getpgrp() == os.getpid():  # we lead our group (the launcher starts us so): take our children too
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait_for_parent, name="medmoe-lifeline", daemon=True).start()
    return True
