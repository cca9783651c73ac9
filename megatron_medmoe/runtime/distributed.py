"""Join the job: process group, megatron-core's parallel state, and the random seeds."""
from __future__ import annotations

import datetime
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from ..config import RunConfig
from . import cpu_compat
from .device import gpu_code_path
from .env import DistEnv, LaunchEnvError


def initialize_distributed(cfg: RunConfig, env: DistEnv, timeout_minutes: int = 10) -> None:
    cpu_mode = cpu_compat.apply_if_cpu()
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "gloo" if cpu_mode else "nccl"
    if backend == "nccl" and cpu_mode:
        raise RuntimeError("parallel.backend=nccl needs GPUs, and none is present; use gloo or auto")
    if not cpu_mode:
        torch.cuda.set_device(gpu_of_rank(env, torch.cuda.device_count()))
    if env.world_size != cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.data:
        raise RuntimeError(f"{env.launcher} started {env.world_size} ranks but the resolved layout needs "
                           f"{cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.data}")
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    par = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor,
        pipeline_model_parallel_size=par.pipeline,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline,
        expert_model_parallel_size=par.expert,
        expert_tensor_parallel_size=par.expert_tensor,
        distributed_timeout_minutes=timeout_minutes,
        # megatron-core's gloo copies of its groups serve the distributed optimizer (its memory-efficient
        # fully_reshardable checkpoints gather over them); the CPU path's optimizer needs none, and on gloo they
        # would only duplicate the groups themselves (a rendezvous each at start)
        create_gloo_process_groups=backend != "gloo" or gpu_code_path(),
    )
    set_seeds(cfg.training.seed)


def gpu_of_rank(env: DistEnv, gpus: int) -> int:
    """The GPU index a rank uses. torchrun (and `medmoe train`'s own workers) show every rank all of the node's
    GPUs: a local rank past them would share one, which NCCL refuses with an error that does not say so. Slurm
    and MPI may bind each task to its own GPUs (CUDA_VISIBLE_DEVICES per task), so there the index wraps."""
    if env.launcher == "torchrun" and env.local_rank >= gpus:
        raise LaunchEnvError(f"rank {env.rank} is local rank {env.local_rank} of a node with {gpus} GPU(s): start at "
                             f"most one rank per GPU (this layout's {env.world_size} ranks need {env.world_size} "
                             "GPUs), or run on CPU with CUDA_VISIBLE_DEVICES=")
    return env.local_rank % gpus


def set_seeds(seed: int) -> None:
    """Megatron's convention: one seed per pipeline stage; megatron-core derives the tensor- and
    expert-parallel RNG streams from it."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def collective_device() -> torch.device:
    """Where tensors for collectives live: the GPU with NCCL, the CPU with gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shutdown_distributed() -> None:
    if dist.is_initialized():
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
