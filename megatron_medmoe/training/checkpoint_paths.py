"""Where checkpoints are in a save directory (Megatron's layout), without importing megatron-core.

    SAVE_DIR/iter_0000100/                  one checkpoint
    SAVE_DIR/latest_checkpointed_iteration.txt
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

LATEST = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run."""


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def latest_iteration(save_dir: str) -> Optional[int]:
    """The iteration LATEST names, None without the file; CheckpointError when it cannot be read as one."""
    path = os.path.join(save_dir, LATEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
        text = raw.decode("ascii").strip()
        if not text.isdigit():
            raise ValueError
        return int(text)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from e
    except (ValueError, UnicodeDecodeError):
        shown = repr(raw[:40].decode()) if raw[:40].isascii() and raw[:40].decode().isprintable() else \
            f"{len(raw)} bytes of binary data"
        raise CheckpointError(f"{path} is damaged: expected an iteration number, got {shown}") from None


def saved_iterations(save_dir: str) -> List[int]:
    """The iterations a save directory holds a directory for (complete or not), ascending."""
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_DIR.match, names) if m)


def find_checkpoint(load_dir: str) -> str:
    """A checkpoint directory itself, or the latest complete one of a save directory."""
    iteration = latest_iteration(load_dir)
    if iteration is not None:
        path = iteration_dir(load_dir, iteration)
        if not os.path.isdir(path):
            raise CheckpointError(f"{os.path.join(load_dir, LATEST)} names iteration {iteration}, but {path} "
                                  "does not exist")
        return path
    if os.path.isfile(os.path.join(load_dir, "metadata.json")):
        return load_dir
    raise CheckpointError(f"no checkpoint in {load_dir!r}: expected {LATEST} or a dist_checkpointing "
                          "directory (with metadata.json)")
