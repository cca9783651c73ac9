"""Model checkpoints through megatron-core's dist_checkpointing (torch_dist), in Megatron's layout.

    SAVE_DIR/iter_0000100/            one checkpoint: sharded tensors + run_config.yaml
    SAVE_DIR/latest_checkpointed_iteration.txt

dist_checkpointing does the resharding: a checkpoint saved under one TP/PP/EP layout loads under any
other. Experts are keyed by expert index, not slot (model/placement.py), so padding slots are neither
saved nor expected.
"""
from __future__ import annotations

import os
import shutil
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing

from ..config import RunConfig, dump_config
from ..model.experts import SlottedSequentialMLP

LATEST = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model."""


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def _model_state(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_checkpoint(save_dir: str, iteration: int, chunks: List[torch.nn.Module], cfg: RunConfig) -> str:
    """Write iteration `iteration` beside its final place, move it there once every rank has finished
    writing, then mark it latest: a crash mid-save leaves the previous checkpoints as they were."""
    final = iteration_dir(save_dir, iteration)
    partial = f"{final}.partial"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    state = _model_state(chunks)
    state["iteration"] = iteration
    dist_checkpointing.save(state, partial)
    dist.barrier()
    if dist.get_rank() == 0:
        dump_config(cfg, os.path.join(partial, "run_config.yaml"))
        if os.path.exists(final):  # saving the same step again replaces it whole
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = os.path.join(save_dir, f".{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(f"{iteration}\n")
        os.replace(tmp, os.path.join(save_dir, LATEST))
    dist.barrier()
    return final


def find_checkpoint(load_dir: str) -> str:
    """A checkpoint directory itself, or the latest one listed in a save directory."""
    latest = os.path.join(load_dir, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            text = f.read().strip()
        try:
            path = iteration_dir(load_dir, int(text))
        except ValueError as e:
            raise CheckpointError(f"{latest}: expected an iteration number, got {text!r}") from e
        if not os.path.isdir(path):
            raise CheckpointError(f"{latest} names iteration {text}, but {path} does not exist")
        return path
    if os.path.isfile(os.path.join(load_dir, "metadata.json")):
        return load_dir
    raise CheckpointError(f"no checkpoint in {load_dir!r}: expected {LATEST} or a dist_checkpointing "
                          "directory (with metadata.json)")


def _padding_prefixes(chunk) -> List[str]:
    """State-dict prefixes of padding expert slots, which checkpoints leave out."""
    prefixes = []
    for name, module in chunk.named_modules():
        if isinstance(module, SlottedSequentialMLP):
            for local_idx in range(module.num_local_experts):
                if module.expert_of_slot[module.first_slot + local_idx] < 0:
                    prefixes.append(f"{name}.local_experts.{local_idx}.")
    return prefixes


def load_checkpoint(load_dir: str, chunks: List[torch.nn.Module]) -> Optional[int]:
    """Load model weights in place; returns the iteration the checkpoint was saved at."""
    path = find_checkpoint(load_dir)
    state = _model_state(chunks)
    state["iteration"] = 0
    try:
        loaded = dist_checkpointing.load(state, path)
    except Exception as e:  # dist_checkpointing raises several kinds for a broken or foreign checkpoint
        raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {e}") from e
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        missing, unexpected = chunk.load_state_dict(loaded[key], strict=False)
        padding = tuple(_padding_prefixes(chunk))
        missing = [k for k in missing if not k.startswith(padding) and not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return int(loaded["iteration"])
