"""Optimizer, learning-rate schedule and gradient clipping.

GPU: megatron-core's optimizer (mixed precision, optional distributed optimizer). CPU: torch's AdamW on
the fp32 gradients megatron-core's DDP reduced, with the global gradient norm computed the way
megatron-core's optimizer computes it (each gradient counted once across tensor- and expert-parallel
ranks). Both follow megatron-core's OptimizerParamScheduler for warm-up and decay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from ..config import TrainingConfig


def decay_groups(params: List[torch.nn.Parameter], weight_decay: float) -> List[dict]:
    """Megatron's rule: no weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0, "lr_mult": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0, "lr_mult": 1.0}]


def _is_expert(param) -> bool:
    return not getattr(param, "allreduce", True)  # megatron-core marks expert parameters allreduce=False


def global_grad_norm(params: List[torch.nn.Parameter]) -> float:
    """L2 norm of all gradients of the model, identical on every rank."""
    sq = {False: torch.zeros(1, dtype=torch.float64), True: torch.zeros(1, dtype=torch.float64)}
    for p in params:
        if p.grad is not None and param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
            sq[_is_expert(p)] += p.grad.detach().double().pow(2).sum().cpu()
    dist.all_reduce(sq[False], group=parallel_state.get_model_parallel_group())
    dist.all_reduce(sq[True], group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return math.sqrt(float(sq[False] + sq[True]))


@dataclass
class CpuOptimizer:
    """torch AdamW over megatron-core DDP's reduced gradients, with global-norm clipping."""

    optimizer: torch.optim.Optimizer
    params: List[torch.nn.Parameter]
    clip_grad: float

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        """Returns (updated, grad_norm, None), as megatron-core's optimizer returns (.., .., zeros)."""
        for p in self.params:
            p.grad = p.main_grad  # DDP accumulates and reduces into the fp32 main_grad buffer
        norm = global_grad_norm(self.params)
        if not math.isfinite(norm):
            return False, norm, None
        if self.clip_grad > 0 and norm > self.clip_grad:
            scale = self.clip_grad / (norm + 1e-6)
            for p in self.params:
                p.grad.mul_(scale)
        self.optimizer.step()
        return True, norm, None

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)


def build_optimizer(chunks, tr: TrainingConfig, on_gpu: bool):
    params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    if not on_gpu:
        adamw = torch.optim.AdamW(decay_groups(params, tr.weight_decay), lr=tr.lr,
                                  betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps)
        return CpuOptimizer(adamw, params, tr.clip_grad)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=tr.lr, min_lr=tr.min_lr, weight_decay=tr.weight_decay,
                             adam_beta1=tr.adam_beta1, adam_beta2=tr.adam_beta2, adam_eps=tr.adam_eps,
                             clip_grad=tr.clip_grad, bf16=tr.precision == "bf16",
                             params_dtype=torch.bfloat16 if tr.precision == "bf16" else torch.float32,
                             use_distributed_optimizer=True)
    return get_megatron_optimizer(config, chunks)


def build_scheduler(optimizer, tr: TrainingConfig) -> OptimizerParamScheduler:
    decay_steps = tr.lr_decay_steps or max(tr.train_steps, 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=tr.lr,
        min_lr=tr.min_lr,
        lr_warmup_steps=min(tr.lr_warmup_steps, decay_steps - 1) if decay_steps > 1 else 0,
        lr_decay_steps=decay_steps,
        lr_decay_style=tr.lr_decay_style,
        start_wd=tr.weight_decay,
        end_wd=tr.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


def current_lr(optimizer) -> Optional[float]:
    groups = optimizer.param_groups
    return groups[0]["lr"] if groups else None
