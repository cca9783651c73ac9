"""Where checkpoints are in a save directory (Megatron's layout), without importing megatron-core.

    SAVE_DIR/iter_0000100/                  one checkpoint
    SAVE_DIR/latest_checkpointed_iteration.txt
"""
from __future__ import annotations

import os
import re
from typing import Optional

LATEST = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run."""


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def latest_iteration(save_dir: str) -> Optional[int]:
    path = os.path.join(save_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: expected an iteration number, got {text!r}") from e


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
