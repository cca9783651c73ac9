"""One training stage on megatron-core: DDP-wrapped model chunks, its pipeline schedules, our optimizer.

Where it starts: the latest checkpoint of checkpoint.save if there is one (resume everything: weights,
optimizer, schedule, data position, random states), else checkpoint.load (everything, or with
checkpoint.finetune the weights only), else fresh weights. Where it stops: after train_steps; after a
non-finite loss or gradient (training.on_nonfinite=stop); or, saving first, when any rank got SIGTERM or
SIGUSR1 or the wall-clock limit passed, all ranks at the same step (exit code EXIT_REQUEUE). Validation
(training/validation.py) and the dev-set accuracy (training/mcq_dev.py) run every training.eval_interval /
mcq_eval_interval steps and after the last one.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from ..config import RunConfig, config_to_dict
from ..data.loader import TrainingData, batch_source
from ..data.validation import ValidationData
from ..languages import load_registry
from ..model.gpt import build_model_chunks
from ..runtime.device import gpu_code_path
from ..runtime.distributed import collective_device, initialize_distributed, shutdown_distributed
from ..runtime.env import DistEnv
from ..runtime.exit_codes import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE
from .checkpoint import LATEST, TrainState, current_layout, load_checkpoint, save_checkpoint
from .loggers import open_writers
from .metrics import TrainingMetrics
from .optimizer import build_optimizer, build_scheduler, current_lr, step_if_finite
from .signals import process_stop_request
from .step import make_forward_step, sum_reports
from .mcq_dev import open_mcq_dev
from .validation import Validator, weights_gathered


def wrap_ddp(chunks, cfg: RunConfig, on_gpu: bool):
    """megatron-core's DDP around each model chunk, wired into its schedules as Megatron-LM does: gradients are
    reduced after the step's last micro-batch (no_sync before it); with parallel.overlap_grad_reduce, bucket by
    bucket as their gradients are ready, each chunk's started by the pipeline schedule (grad_sync_func)."""
    config = chunks[0].config
    par = cfg.parallel
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=par.overlap_grad_reduce,
                                               bucket_size=par.ddp_bucket_size, use_distributed_optimizer=on_gpu,
                                               overlap_param_gather=par.overlap_param_gather)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]

    def per_chunk(funcs):
        return funcs if len(funcs) > 1 else funcs[0]

    config.no_sync_func = per_chunk([m.no_sync for m in wrapped])
    if par.overlap_grad_reduce:
        config.grad_sync_func = per_chunk([m.start_grad_sync for m in wrapped])
    if par.overlap_param_gather:  # DDP's forward pre-hooks wait for each bucket; the schedules start each chunk's
        config.param_sync_func = per_chunk([m.start_param_sync for m in wrapped])
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def train(cfg: RunConfig, env: DistEnv) -> int:
    initialize_distributed(cfg, env)
    try:
        return _train(cfg)
    finally:
        shutdown_distributed()


def say(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def _start(cfg: RunConfig, models, optimizer, scheduler, on_gpu: bool) -> Tuple[TrainState, bool]:
    """(training state, whether this continues an earlier run of this stage)."""
    ck = cfg.checkpoint
    if ck.save and os.path.isfile(os.path.join(ck.save, LATEST)):
        state = load_checkpoint(ck.save, models, cfg, optimizer, scheduler, resuming=True)
        say(f"resuming from {ck.save} at step {state.iteration} (row {state.consumed_rows})")
        return state, True
    if ck.load and ck.finetune:
        saved = load_checkpoint(ck.load, models, cfg)
        # the mixed-precision and distributed optimizers keep fp32 main copies made when they were built: take
        # the loaded weights, or step 1 writes the initial ones back (Megatron-LM does the same)
        optimizer.reload_model_params()
        say(f"initialized the model weights from {ck.load} (saved at step {saved.iteration}); fresh optimizer")
    elif ck.load:
        state = load_checkpoint(ck.load, models, cfg, optimizer, scheduler)
        say(f"continuing from {ck.load} at step {state.iteration}")
        return state, False
    return TrainState(), False


def _nonfinite(reports) -> Optional[Tuple[int, int]]:
    """Collective: (micro-batch, rank) of the first non-finite loss anywhere in the step, else None."""
    world = dist.get_world_size()
    local = math.inf
    for index, report in enumerate(reports or []):
        if not bool(torch.isfinite(report["lm loss"]).all()):
            local = index * world + dist.get_rank()
            break
    code = torch.tensor([local], dtype=torch.float64, device=collective_device())
    dist.all_reduce(code, op=dist.ReduceOp.MIN)
    return None if math.isinf(code.item()) else divmod(int(code.item()), world)


def _train(cfg: RunConfig) -> int:
    on_gpu = gpu_code_path()
    tr, data = cfg.training, cfg.data
    registry = load_registry(data.language_table)
    models = build_model_chunks(cfg, registry.num_experts)
    chunks = [Float16Module(m.config, m) for m in models] if tr.precision == "bf16" else models
    model = wrap_ddp(chunks, cfg, on_gpu)
    optimizer = build_optimizer(model, tr, on_gpu, cfg.parallel.overlap_param_gather)
    scheduler = build_scheduler(optimizer, tr)
    state, resumed = _start(cfg, models, optimizer, scheduler, on_gpu)
    state.layout = current_layout(cfg, on_gpu)
    if state.iteration >= tr.train_steps:
        if tr.train_steps == 0 and cfg.checkpoint.save and not resumed:  # the initial weights, e.g. to share
            say(f"saved the initial weights: {save_checkpoint(cfg.checkpoint.save, state, models, cfg)}")
        else:
            say(f"already at step {state.iteration} of {tr.train_steps}: nothing to train")
        return EXIT_OK
    remaining = tr.train_steps - state.iteration
    training_data = TrainingData(cfg, registry, total_rows=state.consumed_rows + remaining * tr.global_batch_size)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batches = batch_source(training_data, dp_rank, dp_size, state.consumed_rows)
    resumed_at = state.iteration if resumed else None  # records after it, from a run that died, are superseded
    writers = open_writers(cfg, config_to_dict(cfg), resumed_at=resumed_at) if dist.get_rank() == 0 else []
    metrics = TrainingMetrics(models, registry, cfg, writers, resumed=resumed, resumed_at=resumed_at)
    forward_step = make_forward_step(registry.num_experts)
    forward_backward = get_forward_backward_func()
    tokens_per_step = tr.global_batch_size * data.seq_length
    validation_data = ValidationData(cfg, registry, training_data.datasets, training_data.held_out)
    validator = Validator(validation_data, model, models, forward_step, forward_backward, cfg,
                          registry.num_experts) if validation_data else None
    say(training_data.describe())
    if validator:
        say(validation_data.describe())
    dev = open_mcq_dev(cfg, registry, model, models, forward_backward)
    if dev:
        say(dev.describe())
    say(f"training steps {state.iteration + 1}-{tr.train_steps} on {dist.get_world_size()} ranks (TP "
        f"{cfg.parallel.tensor}, PP {cfg.parallel.pipeline}, EP {cfg.parallel.expert}, DP {dp_size}); "
        f"{sum(p.numel() for m in models for p in m.parameters()):,} parameters on rank 0")
    if cfg.parallel.overlap_grad_reduce:
        buckets = sum(len(g.buckets) for m in model for g in m.bucket_groups + m.expert_parallel_bucket_groups)
        say(f"gradients reduced in {buckets} buckets on rank 0, each as soon as the last micro-batch's backward "
            "pass has produced it (parallel.overlap_grad_reduce)")

    def save() -> Optional[str]:
        if not cfg.checkpoint.save:
            return None
        with weights_gathered(model, cfg.parallel.overlap_param_gather):  # a save holds the updated weights
            return save_checkpoint(cfg.checkpoint.save, state, models, cfg, optimizer, scheduler)

    evaluated_at = {}  # "validation" / "mcq_dev" -> the step it last ran after

    def evaluate(step: int, final: bool = False) -> None:
        """Validation and the dev-set accuracy when due after `step`: at their intervals, and after the last step."""
        for name, evaluator, interval, log in (("validation", validator, tr.eval_interval, metrics.log_validation),
                                               ("mcq_dev", dev, tr.mcq_eval_interval, metrics.log_mcq_dev)):
            due = final or (interval is not None and step % interval == 0)
            if evaluator and due and evaluated_at.get(name) != step:
                log(step, evaluator.run())
                evaluated_at[name] = step

    stop = process_stop_request()  # installed when the rank started: it holds signals of the start-up too
    stop.set_wall_limit(tr.max_wall_minutes)
    saved_at = None
    try:
        if stop.agreed(signals_only=True) is not None:  # a signal during start-up: nothing new to save
            say(f"stopping before step {state.iteration + 1}: a stop signal arrived during start-up; nothing new "
                "to save, run the same command again to resume")
            return EXIT_REQUEUE
        while state.iteration < tr.train_steps:
            for m in model:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            batch = batches.micro_batches(state.consumed_rows, dp_rank, dp_size)
            iterators = [iter(batch) for _ in model] if len(model) > 1 else iter(batch)
            reports = forward_backward(forward_step_func=forward_step, data_iterator=iterators, model=model,
                                       num_microbatches=len(batch), seq_length=data.seq_length,
                                       micro_batch_size=tr.micro_batch_size, forward_only=False)
            step = state.iteration + 1
            lr = current_lr(optimizer)
            bad = _nonfinite(reports)
            if bad is not None:
                where = f"non-finite loss at step {step}, micro-batch {bad[0]} on rank {bad[1]}"
                updated, grad_norm = False, None
            else:
                updated, grad_norm = step_if_finite(optimizer)
                where = None if updated else f"non-finite gradient norm ({grad_norm}) at step {step}"
            if where is not None:
                if tr.on_nonfinite == "stop":
                    say(f"stopping: {where} (training.on_nonfinite=stop); nothing saved from this step")
                    return EXIT_NONFINITE
                say(f"skipping step {step}: {where} (training.on_nonfinite=skip)")
                state.skipped_steps += 1
            else:
                scheduler.step(1)
            state.iteration = step
            state.consumed_rows += tr.global_batch_size
            metrics.add_step(sum_reports(reports) if where is None else {}, grad_norm if where is None else None,
                             where is None, tokens_per_step)
            if step % cfg.logging.log_interval == 0 or step == tr.train_steps:
                metrics.log(step, lr)
            reason = stop.agreed()
            if reason is not None:
                path = save()
                say(f"stopping after step {step} on {reason}: "
                    + (f"saved {path}; run the same command again to resume" if path else
                       "no checkpoint.save, so nothing was saved"))
                return EXIT_REQUEUE
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                save()
                saved_at = step
            evaluate(step)
        if saved_at != state.iteration:
            path = save()
            if path:
                say(f"saved checkpoint {path}")
        evaluate(state.iteration, final=True)  # after the final save
        return EXIT_OK
    finally:
        metrics.close()

