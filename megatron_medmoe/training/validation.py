"""Validation during training: the loss on the validation rows (data/validation.py), overall and per family.

As Megatron-LM evaluates: the model in eval mode (so MoE routing is the inference rule, plain top-k), no
gradients, megatron-core's schedule forward-only on every rank of the layout (pipeline stages pass
activations, expert-parallel ranks exchange tokens); the last stage's losses are summed over the job, once
per data-parallel replica. It leaves training as it found it: no gradient, optimizer state, data position
or random state is touched, the routers' training statistics are set aside meanwhile, and the time it takes is
kept out of the training throughput. So a run with validation trains exactly (bitwise) as one without.
"""
from __future__ import annotations

import contextlib
import time
from typing import List

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from ..data.validation import ValidationData
from ..model.router import FamilyRouter, RoutingStats
from ..runtime.distributed import collective_device
from .step import sum_reports


@contextlib.contextmanager
def weights_gathered(model: List, gathers_params: bool):
    """With parallel.overlap_param_gather the weights lag the optimizer's step until the next forward pass's
    pre-hooks gather them: disabling the hooks gathers them now; the next training forward overlaps again (as
    Megatron-LM does around its saves and evaluations)."""
    if gathers_params:
        for chunk in model:
            chunk.disable_forward_pre_hook()
    try:
        yield
    finally:
        if gathers_params:
            for chunk in model:
                chunk.enable_forward_pre_hook()


@contextlib.contextmanager
def evaluating(model: List, models: List, gathers_params: bool):
    """The DDP-wrapped chunks in eval mode with the weights gathered, the routers' training statistics set aside;
    all restored."""
    routers = [m for c in models for m in c.modules() if isinstance(m, FamilyRouter)]
    kept = [router.stats for router in routers]
    for router in routers:
        router.stats = RoutingStats(router.num_experts)
    for chunk in model:
        chunk.eval()
    try:
        with weights_gathered(model, gathers_params), torch.no_grad():
            yield
    finally:
        for chunk in model:
            chunk.train()
        for router, stats in zip(routers, kept):
            router.stats = stats


def forward_only(model: List, forward_step, forward_backward, batch: List, cfg) -> List[dict]:
    """megatron-core's schedule, forward-only, over one global batch's micro-batches of this rank: the reports of
    the last pipeline stage (nothing elsewhere)."""
    iterators = [iter(batch) for _ in model] if len(model) > 1 else iter(batch)
    return forward_backward(forward_step_func=forward_step, data_iterator=iterators, model=model,
                            num_microbatches=len(batch), seq_length=cfg.data.seq_length,
                            micro_batch_size=cfg.training.micro_batch_size, forward_only=True) or []


def sum_over_job(values: torch.Tensor) -> torch.Tensor:
    """Collective: the sum over the job of what the last stages hold, each tensor-parallel group counted once (its
    ranks hold the same losses)."""
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        values = torch.zeros_like(values)
    values = values.to(collective_device())
    dist.all_reduce(values)
    return values.cpu()


class Validator:
    def __init__(self, data: ValidationData, model: List, models: List, forward_step, forward_backward, cfg,
                 num_families: int):
        """model: the DDP-wrapped chunks the schedule runs; models: the bare chunks (for their routers)."""
        self.data, self.model, self.models, self.cfg, self.num_families = data, model, models, cfg, num_families
        self.forward_step, self.forward_backward = forward_step, forward_backward

    def run(self) -> dict:
        """Collective. {"loss", "family_loss": {index: loss}, "tokens", "family_tokens", "seconds"} over the job."""
        started = time.perf_counter()
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        totals = torch.zeros(2 + 2 * self.num_families, dtype=torch.float64)
        with evaluating(self.model, self.models, self.cfg.parallel.overlap_param_gather):
            for iteration in range(self.data.iterations):
                reports = forward_only(self.model, self.forward_step, self.forward_backward,
                                       self.data.micro_batches(iteration, dp_rank, dp_size), self.cfg)
                if reports:
                    summed = sum_reports(reports)
                    totals += torch.cat([summed["lm loss"].double().cpu(),
                                         summed["family loss"].double().cpu().reshape(-1)])
        totals = sum_over_job(totals)
        lm, family = totals[:2], totals[2:].reshape(2, self.num_families)
        return {"loss": float(lm[0] / lm[1]) if lm[1] > 0 else float("nan"), "tokens": int(lm[1]),
                "family_loss": {i: float(family[0, i] / family[1, i]) for i in range(self.num_families)
                                if family[1, i] > 0},
                "family_tokens": {i: int(family[1, i]) for i in range(self.num_families) if family[1, i] > 0},
                "seconds": time.perf_counter() - started}
