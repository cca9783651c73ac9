"""The training loop on megatron-core: DDP-wrapped model chunks, its pipeline schedules, our optimizer."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from ..config import RunConfig
from ..data.loader import TrainingData, batch_source
from ..languages import load_registry
from ..model.gpt import build_model_chunks
from ..runtime.distributed import initialize_distributed, shutdown_distributed
from ..runtime.env import DistEnv
from .checkpoint import load_checkpoint, save_checkpoint
from .metrics import TrainingMetrics
from .optimizer import build_optimizer, build_scheduler, current_lr
from .step import make_forward_step, sum_reports


def wrap_ddp(chunks, on_gpu: bool):
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=on_gpu)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def train(cfg: RunConfig, env: DistEnv) -> int:
    initialize_distributed(cfg, env)
    try:
        return _train(cfg)
    finally:
        shutdown_distributed()


def _train(cfg: RunConfig) -> int:
    on_gpu = torch.cuda.is_available()
    tr, data = cfg.training, cfg.data
    registry = load_registry(data.language_table)
    training_data = TrainingData(cfg, registry) if tr.train_steps > 0 else None  # bad data fails before the model
    chunks = build_model_chunks(cfg, registry.num_experts)
    if cfg.checkpoint.load:
        iteration = load_checkpoint(cfg.checkpoint.load, chunks)
        if dist.get_rank() == 0:
            print(f"loaded model weights from {cfg.checkpoint.load} (saved at step {iteration})", flush=True)
    if tr.precision == "bf16":  # as Megatron-LM: bf16 weights, fp32 inputs cast in and the loss cast out
        chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
    model = wrap_ddp(chunks, on_gpu)
    optimizer = build_optimizer(model, tr, on_gpu)
    scheduler = build_scheduler(optimizer, tr)
    metrics = TrainingMetrics(chunks, registry, cfg.model.num_layers, cfg.moe.moe_last_n, cfg.logging.output_dir)

    forward_step = make_forward_step(registry.num_experts)
    forward_backward = get_forward_backward_func()
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batches = batch_source(training_data, dp_rank, dp_size) if training_data is not None else None
    tokens_per_step = tr.global_batch_size * data.seq_length
    if dist.get_rank() == 0:
        if training_data is not None:
            print(training_data.describe(), flush=True)
        params = sum(p.numel() for c in chunks for p in c.parameters())
        print(f"training {tr.train_steps} steps on {dist.get_world_size()} ranks "
              f"(TP {cfg.parallel.tensor}, PP {cfg.parallel.pipeline}, EP {cfg.parallel.expert}, DP {dp_size}); "
              f"{params:,} parameters on rank 0", flush=True)

    for step in range(tr.train_steps):
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        batch = batches.micro_batches(step, dp_rank, dp_size)
        iterators = [iter(batch) for _ in model] if len(model) > 1 else iter(batch)
        reports = forward_backward(forward_step_func=forward_step, data_iterator=iterators, model=model,
                                   num_microbatches=len(batch), seq_length=data.seq_length,
                                   micro_batch_size=tr.micro_batch_size, forward_only=False)
        lr = current_lr(optimizer)
        updated, grad_norm, _ = optimizer.step()
        if updated:  # a step skipped for a non-finite gradient does not advance the schedule (as Megatron-LM)
            scheduler.step(1)
        metrics.add_step(sum_reports(reports), grad_norm, updated, tokens_per_step)
        done = step + 1
        if done % cfg.logging.log_interval == 0 or done == tr.train_steps:
            metrics.log(done, lr)
        if cfg.checkpoint.save and cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0 \
                and done != tr.train_steps:
            save_checkpoint(cfg.checkpoint.save, done, chunks, cfg)
    if cfg.checkpoint.save:
        path = save_checkpoint(cfg.checkpoint.save, tr.train_steps, chunks, cfg)
        if dist.get_rank() == 0:
            print(f"saved checkpoint {path}", flush=True)
    return 0
