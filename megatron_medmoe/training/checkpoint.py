"""Checkpoints through megatron-core's dist_checkpointing (torch_dist), in Megatron's layout.

    SAVE_DIR/iter_0000100/            one checkpoint: sharded tensors + run_config.yaml
    SAVE_DIR/latest_checkpointed_iteration.txt

A checkpoint holds the model, the optimizer, the learning-rate schedule, every rank's random-number
states and the training state (step, data position). It is written under iter_N.partial and renamed
only after every rank has finished, then marked latest; so a crash at any moment leaves the previous
checkpoints intact and `find_checkpoint` never returns a half-written one.

dist_checkpointing reshards: model weights load under any TP/PP/EP layout. Optimizer state does too on
CPU (AdamW's moments are sharded like the weights) and on GPU when saved with
checkpoint.optimizer_format=fully_reshardable; the faster dp_reshardable format of the distributed
optimizer only loads under the same TP/PP/EP (any data-parallel size). Experts are keyed by expert index,
not slot (model/placement.py), so padding slots are neither saved nor expected.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from ..config import RunConfig, dump_config
from ..config.validate import grad_bucket_size
from ..model.experts import SlottedSequentialMLP
from .checkpoint_paths import LATEST, _ITER_DIR, CheckpointError, find_checkpoint, iteration_dir, latest_iteration
from .optimizer import schedule_changes

__all__ = ["CheckpointError", "TrainState", "current_layout", "find_checkpoint", "iteration_dir", "latest_iteration",
           "load_checkpoint", "save_checkpoint"]

@dataclass
class TrainState:
    iteration: int = 0  # optimizer steps taken (skipped steps included)
    consumed_rows: int = 0  # data position: packed rows read so far
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    layout: dict = field(default_factory=dict)  # the parallel layout the checkpoint was saved with


def current_layout(cfg: RunConfig, on_gpu: bool) -> dict:
    par = cfg.parallel
    layout = {"tensor": par.tensor, "pipeline": par.pipeline, "virtual_pipeline": par.virtual_pipeline,
              "expert": par.expert, "expert_tensor": par.expert_tensor, "world": dist.get_world_size(),
              "optimizer": ("distributed:" + cfg.checkpoint.optimizer_format) if on_gpu else "adamw"}
    if on_gpu:  # the distributed optimizer's dp_reshardable state is laid out by gradient bucket
        layout["grad_buckets"] = grad_bucket_size(par) or "one"
    return layout


# every layer under its own key (decoder.layers.N.*), dense models too: megatron-core would otherwise stack
# the layers of a homogeneous (dense) model into one tensor per weight, and converters would need two layouts
_MODEL_METADATA = {"non_homogeneous_layers": True}


def _model_state(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict(metadata=dict(_MODEL_METADATA))}
    return {f"model{i}": chunk.sharded_state_dict(metadata=dict(_MODEL_METADATA)) for i, chunk in enumerate(chunks)}


def _rng_state() -> dict:
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(data) -> ShardedObject:
    """Every rank's own generators: restored only under the same layout (else reseeded from the seed)."""
    return ShardedObject("rng_state", data, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _optimizer_state(optimizer, model_state: dict, cfg: RunConfig, is_loading: bool, on_gpu: bool):
    if on_gpu:
        fmt = cfg.checkpoint.optimizer_format
        return optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                            metadata={"distrib_optim_sharding_type": fmt})
    return optimizer.sharded_state_dict(model_state, is_loading=is_loading)


def save_checkpoint(save_dir: str, state: TrainState, chunks: List[torch.nn.Module], cfg: RunConfig,
                    optimizer=None, scheduler=None) -> str:
    """Write iteration `state.iteration` aside, move it into place once every rank is done, mark it
    latest, then drop checkpoints beyond checkpoint.keep_last."""
    on_gpu = torch.cuda.is_available()
    final = iteration_dir(save_dir, state.iteration)
    partial = f"{final}.partial"
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    model_state = _model_state(chunks)
    sharded = dict(model_state)
    if optimizer is not None:
        sharded["optimizer"] = _optimizer_state(optimizer, model_state, cfg, is_loading=False, on_gpu=on_gpu)
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    sharded["rng_state"] = _rng_object(_rng_state())
    sharded["train_state"] = asdict(state)
    dist_checkpointing.save(sharded, partial)
    dist.barrier()
    if dist.get_rank() == 0:
        dump_config(cfg, os.path.join(partial, "run_config.yaml"))
        if os.path.exists(final):  # saving the same step again replaces it whole
            shutil.rmtree(final)
        os.replace(partial, final)
        tmp = os.path.join(save_dir, f".{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(f"{state.iteration}\n")
        os.replace(tmp, os.path.join(save_dir, LATEST))
        _keep_last(save_dir, cfg.checkpoint.keep_last, state.iteration)
    dist.barrier()
    return final


def _keep_last(save_dir: str, keep: Optional[int], latest: int) -> None:
    if not keep:
        return
    iterations = sorted(int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(save_dir)) if m)
    for iteration in iterations[:-keep]:
        if iteration != latest:
            shutil.rmtree(iteration_dir(save_dir, iteration), ignore_errors=True)


def _padding_prefixes(chunk) -> List[str]:
    """State-dict prefixes of padding expert slots, which checkpoints leave out."""
    prefixes = []
    for name, module in chunk.named_modules():
        if isinstance(module, SlottedSequentialMLP):
            for local_idx in range(module.num_local_experts):
                if module.expert_of_slot[module.first_slot + local_idx] < 0:
                    prefixes.append(f"{name}.local_experts.{local_idx}.")
    return prefixes


def load_checkpoint(load_dir: str, chunks: List[torch.nn.Module], cfg: RunConfig, optimizer=None,
                    scheduler=None) -> TrainState:
    """Load in place. With an optimizer: everything (resume); without: the model weights only.

    Returns the saved training state (for a weights-only load, the caller starts from step 0).
    """
    on_gpu = torch.cuda.is_available()
    path = find_checkpoint(load_dir)
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # dist_checkpointing raises several kinds for a broken or foreign checkpoint
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    saved = TrainState(**common.get("train_state", {}))
    layout = current_layout(cfg, on_gpu)
    same_layout = saved.layout == layout
    sharded = _without_absent_extra_state(_model_state(chunks), path)
    model_state = dict(sharded)
    if optimizer is not None:
        if "optimizer" not in common and "opt_param_scheduler" not in common:
            raise CheckpointError(f"{path} holds model weights only: load it with checkpoint.finetune=true")
        if saved.layout.get("optimizer", "").endswith("dp_reshardable") and not _same_model_layout(saved.layout, layout):
            raise CheckpointError(
                f"{path} saved its optimizer state dp_reshardable under TP {saved.layout['tensor']}, PP "
                f"{saved.layout['pipeline']}, EP {saved.layout['expert']}, gradient buckets "
                f"{saved.layout.get('grad_buckets', 'one')}: that state only loads under the same tensor, pipeline "
                "and expert parallel sizes and the same parallel.overlap_grad_reduce / parallel.ddp_bucket_size. "
                "Resume with that layout, or load the weights only "
                "(checkpoint.finetune=true), or save with checkpoint.optimizer_format=fully_reshardable")
        sharded["optimizer"] = _optimizer_state(optimizer, model_state, cfg, is_loading=True, on_gpu=on_gpu)
    if same_layout:
        sharded["rng_state"] = _rng_object(None)
    try:
        loaded = dist_checkpointing.load(sharded, path)
    except Exception as e:
        raise CheckpointError(f"cannot load {path}: {type(e).__name__}: {e}") from e
    for i, chunk in enumerate(chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        missing, unexpected = chunk.load_state_dict(loaded[key], strict=False)
        padding = tuple(_padding_prefixes(chunk))
        missing = [k for k in missing if not k.startswith(padding) and not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{path} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        changes = schedule_changes(common["opt_param_scheduler"], scheduler)
        if changes and dist.get_rank() == 0:
            print(f"the recipe's learning-rate schedule replaces the checkpoint's: {', '.join(changes)}", flush=True)
        scheduler.load_state_dict(common["opt_param_scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
    return saved


def _without_absent_extra_state(model_state: dict, path: str) -> dict:
    """Leave out the layers' `_extra_state` objects (TransformerEngine's FP8 metadata, None for local layers)
    where the checkpoint has none: converted checkpoints hold tensors only, and a checkpoint saved with local
    layers loads into TransformerEngine layers and back."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        present = {key.split("/shard_")[0] for key in FileSystemReader(path).read_metadata().state_dict_metadata}
    except Exception:  # a damaged checkpoint: the load itself reports it
        return model_state
    out = {}
    for name, chunk_state in model_state.items():
        out[name] = {k: v for k, v in chunk_state.items()
                     if not (k.endswith("._extra_state") and getattr(v, "key", k) not in present)}
    return out


def _same_model_layout(a: dict, b: dict) -> bool:
    keys = ("tensor", "pipeline", "virtual_pipeline", "expert", "expert_tensor")
    return all(a.get(k) == b.get(k) for k in keys) and a.get("grad_buckets", "one") == b.get("grad_buckets", "one")
