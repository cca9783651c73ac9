"""Optimizer, learning-rate schedule and gradient clipping.

GPU path (runtime/device.py): megatron-core's optimizer (mixed precision, distributed optimizer), whose
fully_reshardable checkpoints GpuOptimizer makes load under any layout. CPU path: torch's AdamW inside
megatron-core's FP32Optimizer, so that its state checkpoints (and reshards) exactly like megatron-core's;
only the gradient norm and clipping are ours, because megatron-core's allocate CUDA buffers. The norm is
computed as megatron-core computes it: each gradient counted once across tensor- and expert-parallel
ranks. Both follow megatron-core's OptimizerParamScheduler for warm-up and decay.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer.optimizer import (ChainedOptimizer, FP32Optimizer, MegatronOptimizer,
                                               param_group_identifier_keys)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from ..config import TrainingConfig


def param_groups(params: List[torch.nn.Parameter], weight_decay: float) -> List[dict]:
    """Megatron's groups: no weight decay on biases and norm weights (1-D), experts apart. Every group
    exists on every rank, empty or not: a checkpoint's groups (saved by rank 0) are matched by megatron-core
    on every rank by these keys, under any layout."""
    groups = []
    for expert in (False, True):
        for decay in (True, False):
            members = [p for p in params if (p.ndim > 1) == decay and _is_expert(p) == expert]
            groups.append({"params": members, "weight_decay": weight_decay if decay else 0.0,
                           "wd_mult": 1.0 if decay else 0.0, "lr_mult": 1.0, "is_expert_parallel": expert,
                           "is_decoupled_lr": False})
    return groups


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


def _init_adam_state(optimizer: torch.optim.Optimizer, config=None) -> None:
    """Create Adam's moments before loading a checkpoint into them (as megatron-core does)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if len(optimizer.state[p]) == 0:
                optimizer.state[p]["exp_avg"] = torch.zeros_like(p.data)
                optimizer.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


class CpuOptimizer(FP32Optimizer):
    """torch AdamW over megatron-core DDP's fp32 main grads, with global-norm clipping."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig):
        # FP32Optimizer.__init__ only adds a CUDA loss-scale tensor; a CPU one stands in for it
        MegatronOptimizer.__init__(self, optimizer, config, _init_adam_state)
        self._scale = torch.tensor([1.0])
        self.is_stub_optimizer = False

    @torch.no_grad()
    def step(self):
        """(updated, grad_norm, None): no update when the gradient norm is not finite."""
        self.prepare_grads()  # main_grad -> grad
        params = self.get_parameters()
        norm = global_grad_norm(params)
        if not math.isfinite(norm):
            return False, norm, None
        clip = self.config.clip_grad
        if clip > 0 and norm > clip:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(clip / (norm + 1e-6))
        return self.step_with_ready_grads(), norm, None


@torch.no_grad()
def step_if_finite(optimizer) -> Tuple[bool, Optional[float]]:
    """(updated, gradient norm): one optimizer step, or none at all when the gradient norm is not finite.

    megatron-core's own step only checks for inf/NaN with a loss scaler (fp16); in bf16 it would clip by a
    NaN norm and write NaN into every weight. So on GPU this is ChainedOptimizer.step with the check added."""
    if isinstance(optimizer, CpuOptimizer):
        updated, norm, _ = optimizer.step()
        return updated, norm
    if optimizer.prepare_grads():  # a loss scaler found inf/NaN
        return False, None
    norm = float(optimizer.get_grad_norm())
    if not math.isfinite(norm):
        return False, norm
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = member.get_parameters()
        if params and member.config.clip_grad > 0:
            decoupled = member.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            # looked up at the call, not imported by name: on CPU runtime/cpu_compat.py wraps it
            clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=member.config.clip_grad, total_norm=norm,
                                                    use_decoupled_grad=decoupled)
    return optimizer.step_with_ready_grads(), norm


def build_optimizer(chunks, tr: TrainingConfig, on_gpu: bool, overlap_param_gather: bool = False):
    bf16 = tr.precision == "bf16"
    config = OptimizerConfig(optimizer="adam", lr=tr.lr, min_lr=tr.min_lr, weight_decay=tr.weight_decay,
                             adam_beta1=tr.adam_beta1, adam_beta2=tr.adam_beta2, adam_eps=tr.adam_eps,
                             clip_grad=tr.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                             use_distributed_optimizer=on_gpu, overlap_param_gather=overlap_param_gather)
    if not on_gpu:
        params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
        adamw = torch.optim.AdamW(param_groups(params, tr.weight_decay), lr=tr.lr,
                                  betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps)
        return CpuOptimizer(adamw, config)
    from megatron.core.optimizer import get_megatron_optimizer

    return GpuOptimizer(get_megatron_optimizer(config, chunks).chained_optimizers)


class GpuOptimizer(ChainedOptimizer):
    """megatron-core's chained optimizers of a rank (its dense parameters', and its expert parameters' where it
    holds experts under expert parallelism), whose fully_reshardable checkpoints load under any layout.

    In such a checkpoint the tensors are keyed by parameter, but the rest (param groups, Adam's step) is saved
    by rank 0 alone, in its own structure: one entry per optimizer it had. ChainedOptimizer reads that structure
    as if it were the loading rank's, and under another layout a rank may have another number of optimizers
    (EP 1 has no expert optimizer, nor has a pipeline stage without MoE layers): KeyError. Here each optimizer
    takes the saved groups that match its own (megatron-core matches groups by these keys anyway) and its own
    part of the tensors; a group the saving rank 0 did not have keeps its settings and takes the saved step."""

    def load_state_dict(self, state_dict):
        parts = [state_dict] + [v for k, v in state_dict.items() if isinstance(k, int)]
        if not any(p.get("param_state_sharding_type") == "fully_reshardable" for p in parts):
            return super().load_state_dict(state_dict)
        saved = [g for p in parts if "optimizer" in p for g in p["optimizer"]["param_groups"]]
        steps = {g["step"] for g in saved if "step" in g}
        alone = len(self.chained_optimizers) == 1
        for index, member in enumerate(self.chained_optimizers):
            own = state_dict if alone else state_dict[index]
            member.load_state_dict({"optimizer": {"param_groups": _matching_groups(member, saved, steps)},
                                    "param_state": own["param_state"],
                                    "param_state_sharding_type": "fully_reshardable"})
        self._synchronize_steps()


def _matching_groups(member, saved: List[dict], steps: set) -> List[dict]:
    def identity(group):
        return tuple(group.get(k) for k in param_group_identifier_keys)

    by_identity = {identity(g): g for g in saved}
    groups = []
    for group in member.optimizer.param_groups:
        own = {k: v for k, v in group.items() if k != "params"}
        groups.append(by_identity.get(identity(group), {**own, **({"step": min(steps)} if steps else {})}))
    return groups


def build_scheduler(optimizer, tr: TrainingConfig) -> OptimizerParamScheduler:
    decay_steps = tr.lr_decay_steps or max(tr.train_steps, 1)
    warmup = tr.lr_warmup_steps if tr.lr_warmup_fraction is None else round(tr.lr_warmup_fraction * decay_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=tr.lr,
        min_lr=tr.min_lr,
        lr_warmup_steps=min(warmup, decay_steps - 1) if decay_steps > 1 else 0,
        lr_decay_steps=decay_steps,
        lr_decay_style=tr.lr_decay_style,
        start_wd=tr.weight_decay,
        end_wd=tr.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        # on resume the recipe's schedule wins (a run extended to more steps decays over the new length);
        # load_checkpoint says which values changed. megatron-core's default silently keeps the checkpoint's.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


SCHEDULE_FIELDS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd",
                   "end_wd", "wd_incr_steps", "wd_incr_style")


def schedule_changes(saved: dict, scheduler: OptimizerParamScheduler) -> List[str]:
    """'field old -> new' for each schedule setting where the recipe differs from a checkpoint's scheduler."""
    current = scheduler.state_dict()
    return [f"{k} {saved[k]} -> {current[k]}" for k in SCHEDULE_FIELDS
            if k in saved and k in current and saved[k] != current[k]]


def current_lr(optimizer) -> Optional[float]:
    groups = optimizer.param_groups
    return groups[0]["lr"] if groups else None
