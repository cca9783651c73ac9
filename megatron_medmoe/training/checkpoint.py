"""Checkpoints through megatron-core's dist_checkpointing (torch_dist), in Megatron's layout.

    SAVE_DIR/iter_0000100/            one checkpoint: sharded tensors + run_config.yaml
    SAVE_DIR/latest_checkpointed_iteration.txt

A checkpoint holds the model, the optimizer, the learning-rate schedule, every rank's random-number
states and the training state (step, data position). It is written under iter_N.partial with a manifest of
every file's size and checksum (training/manifest.py), renamed only after every rank has finished, then
marked latest; so a crash at any moment leaves the previous checkpoints intact. Loads verify the manifest
first: a damaged checkpoint is an error naming the file (or, with checkpoint.fallback, skipped loudly).

dist_checkpointing reshards: model weights load under any TP/PP/EP layout. Optimizer state does too on
CPU (AdamW's moments are sharded like the weights) and on GPU when saved with
checkpoint.optimizer_format=fully_reshardable; the faster dp_reshardable format of the distributed
optimizer only loads under the same TP/PP/EP (any data-parallel size). Experts are keyed by expert index,
not slot (model/placement.py), so padding slots are neither saved nor expected.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica

from ..config import RunConfig, dump_config
from ..config.validate import grad_bucket_size
from ..model.experts import SlottedSequentialMLP
from ..runtime.device import gpu_code_path
from ..runtime.distributed import collective_device
from .checkpoint_paths import (LATEST, CheckpointError, find_checkpoint, iteration_dir, latest_iteration,
                               saved_iterations)
from .manifest import (ChecksumWhileWriting, ShardChecksumsMeanwhile, checkpoint_problem, damaged_message,
                       fallback_candidates, is_shard, read_manifest, write_manifest)
from .optimizer import schedule_changes

__all__ = ["CheckpointError", "TrainState", "current_layout", "find_checkpoint", "iteration_dir", "latest_iteration",
           "load_checkpoint", "save_checkpoint", "verified_path"]

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
        metadata = {"distrib_optim_sharding_type": fmt}
        if fmt == "fully_reshardable":
            # gathered to data-parallel rank 0 over gloo as it saves, not all-gathered to every rank: the plain
            # variant holds the whole state in host memory on every rank (~45 GB per rank at 7B). megatron-core
            # loads either variant's checkpoints with either setting
            metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
            # keys named by parameter alone, as Megatron-LM saves them: the chained_N. prefix counts this rank's
            # optimizers (dense, experts), which differ between layouts
            metadata["chained_optim_avoid_prefix"] = True
        return optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    return optimizer.sharded_state_dict(model_state, is_loading=is_loading)


def save_checkpoint(save_dir: str, state: TrainState, chunks: List[torch.nn.Module], cfg: RunConfig,
                    optimizer=None, scheduler=None) -> str:
    """Write iteration `state.iteration` aside with its manifest, move it into place once every rank is done,
    mark it latest, then drop checkpoints beyond checkpoint.keep_last. A disk that cannot hold it is found
    before anything is written where possible, and otherwise the partial checkpoint is removed: either way
    the previous checkpoint stays the latest and CheckpointError names the directory and the space needed."""
    on_gpu = gpu_code_path()
    final = iteration_dir(save_dir, state.iteration)
    partial = f"{final}.partial"
    model_state = _model_state(chunks)
    sharded = dict(model_state)
    if optimizer is not None:
        sharded["optimizer"] = _optimizer_state(optimizer, model_state, cfg, is_loading=False, on_gpu=on_gpu)
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    sharded["rng_state"] = _rng_object(_rng_state())
    sharded["train_state"] = asdict(state)
    needed = _bytes_to_write(sharded, save_dir)
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        _remove_partials(save_dir)  # left by saves that died: we hold the directory's lock
    _check_free_space(save_dir, needed, state.iteration)
    if dist.get_rank() == 0:
        os.makedirs(partial)
    dist.barrier()
    failure = None
    hashing = ChecksumWhileWriting(partial, dist.get_rank())
    try:
        with hashing:
            dist_checkpointing.save(sharded, partial)
    except BaseException as e:  # CheckpointException (a BaseException) too: the coordinator raises for any rank
        failure = e
    failure = _agree_on_failure(failure)
    entries = {}
    if failure is None:
        try:
            if dist.get_rank() == 0:
                dump_config(cfg, os.path.join(partial, "run_config.yaml"))
            entries = hashing.entries()
        except OSError as e:
            failure = e
        failure = _agree_on_failure(failure)
    if failure is None:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, entries)
        if dist.get_rank() == 0:
            try:
                write_manifest(partial, {k: v for part in gathered for k, v in part.items()})
                if os.path.exists(final):  # saving the same step again replaces it whole
                    shutil.rmtree(final)
                os.replace(partial, final)
                _write_latest(save_dir, state.iteration)
            except OSError as e:
                failure = e
        failure = _agree_on_failure(failure)
    if failure is not None:
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(_save_failure_message(failure, save_dir, state.iteration, needed)) from None
    if dist.get_rank() == 0:
        _keep_last(save_dir, cfg.checkpoint.keep_last, state.iteration)
    dist.barrier()
    return final


def _write_latest(save_dir: str, iteration: int) -> None:
    tmp = os.path.join(save_dir, f".{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(save_dir, LATEST))


def _remove_partials(save_dir: str) -> None:
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        if name.startswith("iter_") and name.endswith(".partial"):
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


def _bytes_to_write(sharded: dict, save_dir: str) -> int:
    """About how much the checkpoint takes on disk: the tensors every rank writes (main replicas), at least
    what the previous checkpoint took."""
    local = sum(v.data.numel() * v.data.element_size() for v in nested_values(sharded)
                if isinstance(v, ShardedTensor) and v.data is not None and is_main_replica(v.replica_id))
    total = torch.tensor([local], dtype=torch.float64, device=collective_device())
    dist.all_reduce(total)
    previous = 0
    try:
        latest = latest_iteration(save_dir)
    except CheckpointError:
        latest = None
    if latest is not None:
        try:
            previous = sum(e["size"] for e in read_manifest(iteration_dir(save_dir, latest)).values())
        except CheckpointError:
            pass
    return max(int(total.item()), previous)


def _free_bytes(directory: str) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def _free_everywhere(save_dir: str) -> int:
    """Collective: rank 0's view of the free space (ranks agree on it)."""
    free = torch.tensor([_free_bytes(save_dir) if dist.get_rank() == 0 else 0], dtype=torch.float64,
                        device=collective_device())
    dist.broadcast(free, src=0)
    return int(free.item())


def _check_free_space(save_dir: str, needed: int, iteration: int) -> None:
    """Collective: refuse a save the disk cannot hold before writing any of it (5% margin for metadata)."""
    free = _free_everywhere(save_dir)
    if free < needed * 1.05:
        raise CheckpointError(_disk_full(save_dir, iteration, needed, free))


def _disk_full(save_dir: str, iteration: int, needed: int, free: int) -> str:
    return (f"cannot save step {iteration} to {save_dir}: not enough disk space (the checkpoint needs about "
            f"{_gib(needed)}, {_gib(free)} free). Nothing of it was kept and the previous checkpoint stays the "
            "latest; free space (or set checkpoint.keep_last) and run the same command again")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _agree_on_failure(failure: Optional[BaseException]) -> Optional[BaseException]:
    """Collective: every rank learns whether any rank failed; ranks that did not keep a stand-in error."""
    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) and failure is None:
        return RuntimeError("another rank could not write its part")
    return failure


def _save_failure_message(failure: BaseException, save_dir: str, iteration: int, needed: int) -> str:
    """Collective (after the partial checkpoint was removed). A disk that filled up while writing shows as many
    errors (torch's zip writer reports a wrong position, not ENOSPC): the free space tells."""
    dist.barrier()
    free = _free_everywhere(save_dir)
    if _is_disk_full(failure) or free < needed * 1.05:
        return _disk_full(save_dir, iteration, needed, free)
    first_line = (str(failure).strip().splitlines() or [""])[0]
    return (f"cannot save step {iteration} to {save_dir}: {type(failure).__name__}: {first_line}. The partial "
            "checkpoint was removed and the previous checkpoint stays the latest")


def _is_disk_full(failure: BaseException) -> bool:
    seen = failure
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _keep_last(save_dir: str, keep: Optional[int], latest: int) -> None:
    if not keep:
        return
    for iteration in saved_iterations(save_dir)[:-keep]:
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


def _first_problem(problem: Optional[str]) -> Optional[str]:
    """Collective: the first rank's problem, on every rank."""
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def _share() -> Tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _problem_anywhere(path: str, shards_later: bool = False) -> Optional[str]:
    """Collective: the ranks verify the checkpoint together (each checksums a share of its files; with
    `shards_later` the small files only, the shards' sizes aside: their checksums run while they load)."""
    checksum_if = (lambda name: not is_shard(name)) if shards_later else (lambda name: True)
    return _first_problem(checkpoint_problem(path, share=_share(), checksum_if=checksum_if))


def verified_path(load_dir: str, fallback: bool = False, resuming: bool = False, shards_later: bool = False) -> str:
    """Collective: the checkpoint to load from `load_dir` (a checkpoint, or a save directory's latest), verified
    against its manifest. A damaged latest is a CheckpointError naming the file, or with `fallback` the newest
    checkpoint of the save directory that verifies, announced loudly. When resuming (our own save directory,
    whose lock we hold) the damaged newer checkpoints are set aside as iter_N.damaged and latest rewritten.
    `shards_later`: the shards' checksums are left to the caller (ShardChecksumsMeanwhile)."""
    try:
        path = find_checkpoint(load_dir)
        problem = _problem_anywhere(path, shards_later)
    except CheckpointError as e:  # LATEST unreadable or naming a missing iteration
        if not saved_iterations(load_dir):
            raise
        path, problem = None, str(e)
    if problem is None:
        return path
    if not fallback:
        raise CheckpointError(damaged_message(problem))
    for candidate in fallback_candidates(load_dir):
        if candidate != path and _problem_anywhere(candidate) is None:
            break
    else:
        raise CheckpointError(f"{problem}; and no other checkpoint in {load_dir} verifies (checkpoint.fallback)")
    if dist.get_rank() == 0:
        print(f"WARNING: {problem}.\nWARNING: checkpoint.fallback: loading {candidate} instead, the newest checkpoint "
              f"of {load_dir} that verifies; the steps after it are trained again", flush=True)
        if resuming:
            _set_aside_newer(load_dir, candidate)
    dist.barrier()
    return candidate


def _set_aside_newer(save_dir: str, kept: str) -> None:
    kept_iteration = int(os.path.basename(kept)[len("iter_"):])
    for iteration in saved_iterations(save_dir):
        if iteration > kept_iteration:
            damaged = iteration_dir(save_dir, iteration)
            os.replace(damaged, f"{damaged}.damaged")
            print(f"WARNING: set aside {damaged} as {damaged}.damaged", flush=True)
    _write_latest(save_dir, kept_iteration)


def load_checkpoint(load_dir: str, chunks: List[torch.nn.Module], cfg: RunConfig, optimizer=None,
                    scheduler=None, resuming: bool = False) -> TrainState:
    """Load in place. With an optimizer: everything (resume); without: the model weights only.

    Returns the saved training state (for a weights-only load, the caller starts from step 0).
    """
    on_gpu = gpu_code_path()
    # the shards' checksums run while they load (checkpoint.fallback has to know first which checkpoint verifies)
    shards_later = not cfg.checkpoint.fallback
    path = verified_path(load_dir, cfg.checkpoint.fallback, resuming, shards_later)
    meanwhile = ShardChecksumsMeanwhile(path, _share()) if shards_later else None
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except BaseException as e:  # dist_checkpointing raises several kinds for a broken or foreign checkpoint
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
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
    load_error = None
    try:
        loaded = dist_checkpointing.load(sharded, path)
    except BaseException as e:  # torch's CheckpointException is a BaseException
        load_error = e
    problem = _first_problem(meanwhile.problem()) if meanwhile is not None else None
    if problem:  # nothing loaded from a damaged shard is used: the run stops here
        raise CheckpointError(damaged_message(problem))
    if load_error is not None:
        raise CheckpointError(f"cannot load {path}: {type(load_error).__name__}: {load_error}") from None
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
