"""Enumerate the parallel layouts of a recipe on N nodes x G GPUs, estimate each, rank those that fit.

A candidate is a recipe with parallel.{tensor, pipeline, virtual_pipeline, expert, expert_tensor, data},
moe.expert_slots and training.micro_batch_size (the recipe's or a smaller power of two, the global batch
unchanged) replaced (interleaving: 2 or 4 model chunks per pipeline rank where the layers divide); it
must pass the same validation as `medmoe train` (config/validate.py). For each, the cheapest recomputation
(none, selective, full) whose peak memory fits is chosen. The estimated step time, used to rank, assumes:
- compute: the step's model FLOPs per GPU at `efficiency` x the GPU's bf16 peak (with fp8.format, the GEMMs
  at twice that; attention's scores and values stay bf16), x 4/3 with full recomputation, the expert share
  scaled by the busiest expert rank's load, plus the 1F1B bubble (p - 1) / (v M);
- communication at NVLink bandwidth inside a node and the network's between nodes (ranks are ordered tensor,
  expert, data, pipeline, as megatron-core does), not overlapped with compute, except with
  parallel.overlap_grad_reduce the gradient reduction: it runs during the last micro-batch's backward pass
  (2/3 of that micro-batch's compute), all but its last bucket (the first layers' gradients, ready last);
  and with parallel.overlap_param_gather the all-gather of the updated weights: it runs during the next
  step's first forward pass (1/3 of a micro-batch's compute), all but its first bucket (the first layers'
  weights, needed first).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..config import ConfigError, RunConfig, resolve_config
from ..config.validate import grad_bucket_size
from ..training.flops import flops_per_token, macs_per_token
from .comm import StepComm, step_comm
from .memory import GiB, StageMemory, peak_memory, stage_params
from .placement import Placement, balance_experts, expert_loads

RECOMPUTE = (None, "selective", "full")


@dataclass(frozen=True)
class Machine:
    nodes: int
    gpus_per_node: int
    gpu_memory: float  # bytes
    peak_tflops: float = 989.0  # dense bf16, H100 SXM
    efficiency: float = 0.5  # share of the peak the matrix math reaches
    nvlink_gbps: float = 360.0  # GB/s per GPU inside a node (NCCL bus bandwidth)
    network_gbps: float = 45.0  # GB/s per GPU between nodes (one 400 Gb/s NIC per GPU)
    reserve: float = 2 * GiB  # CUDA context, NCCL and allocator slack kept free on every GPU
    gpu: str = "GPU"  # its name, for the reader

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Candidate:
    tensor: int
    pipeline: int
    virtual_pipeline: Optional[int]
    expert: int
    expert_tensor: int
    data: int
    micro_batch: int
    expert_slots: Optional[int]
    sequence_parallel: bool
    recompute: Optional[str]
    memory: StageMemory
    memory_by_recompute: Dict[str, float]
    comm: StepComm
    comm_seconds: Dict[str, float]
    compute_seconds: float
    bubble: float
    step_seconds: float
    tokens_per_s_per_gpu: float
    mfu: float  # model FLOPs per GPU per estimated step / the GPU's bf16 peak (FP8 counted against it too)
    fits: bool
    placement: Optional[Placement] = None
    overrides: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("tensor", "pipeline", "virtual_pipeline", "expert", "expert_tensor", "data", "micro_batch",
                                             "expert_slots", "sequence_parallel", "recompute", "bubble",
                                             "compute_seconds", "step_seconds", "tokens_per_s_per_gpu", "mfu", "fits",
                                             "overrides", "memory_by_recompute", "comm_seconds")}
        out["memory"] = self.memory.as_dict()
        out["comm_bytes"] = self.comm.as_dict()
        if self.placement is not None:
            out["expert_placement"] = {"slot_of_expert": self.placement.slot_of_expert,
                                       "experts_of_rank": [list(g) for g in self.placement.experts_of_rank],
                                       "rank_loads": list(self.placement.rank_loads)}
        return out


def _powers_of_two(limit: int) -> List[int]:
    return [1 << i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def _expert_sizes(num_experts: int, world: int) -> List[int]:
    sizes = set(_powers_of_two(min(world, 1 << math.ceil(math.log2(max(num_experts, 1))))))
    if num_experts <= world:
        sizes.add(num_experts)
    return sorted(sizes)


def layout_config(cfg: RunConfig, world: int, tensor: int, pipeline: int, expert: int, expert_tensor: int,
                  micro_batch: int, num_experts: int, virtual_pipeline: Optional[int] = None) -> RunConfig:
    """The recipe under this layout, resolved; ConfigError when the layout breaks a rule."""
    c = copy.deepcopy(cfg)
    par = c.parallel
    par.tensor, par.pipeline, par.expert, par.expert_tensor = tensor, pipeline, expert, expert_tensor
    par.data, par.virtual_pipeline, par.sequence_parallel = None, virtual_pipeline, None
    c.training.micro_batch_size = micro_batch
    if c.moe.moe_last_n > 0:
        c.moe.expert_slots = -(-num_experts // expert) * expert
        c.moe.expert_placement = None
        if c.moe.grouped_gemm and c.moe.expert_slots != num_experts:
            c.moe.grouped_gemm = None
    return resolve_config(c, world_size=world, check_files=False)


def _bandwidth(span: int, machine: Machine) -> float:
    """Bytes/s of a group whose ranks span `span` consecutive GPUs: NVLink inside a node, else the network."""
    return (machine.network_gbps if span > machine.gpus_per_node else machine.nvlink_gbps) * 1e9


def estimate(cfg: RunConfig, machine: Machine, num_experts: int, family_shares: Sequence[float],
             placements: Dict[int, Placement]) -> Candidate:
    par, tr = cfg.parallel, cfg.training
    t, p, e, et, dp = par.tensor, par.pipeline, par.expert, par.expert_tensor, par.data
    moe = cfg.moe.moe_last_n > 0
    placement = None
    share = 1.0 / e
    if moe:
        if e not in placements:
            loads = expert_loads(family_shares, cfg.moe.topk, cfg.moe.routing)
            placements[e] = balance_experts(loads, e, cfg.moe.expert_slots)
        placement = placements[e]
        share = placement.max_load
    usable = machine.gpu_memory - machine.reserve
    by_recompute = {r or "none": peak_memory(cfg, num_experts, r, share) for r in RECOMPUTE}
    recompute = next((r for r in RECOMPUTE if by_recompute[r or "none"].total <= usable), "full")
    memory = by_recompute[recompute or "none"]
    stage, comm = max(((s, step_comm(cfg, s, num_experts, recompute)) for s in range(p)), key=lambda sc: sc[1].total)

    tokens = tr.global_batch_size * cfg.data.seq_length
    step_flops = flops_per_token(cfg, num_experts) * tokens / machine.world
    macs = macs_per_token(cfg, num_experts)
    expert_share, attention = macs["experts"] / sum(macs.values()), macs["attention"] / sum(macs.values())
    imbalance = 1 - expert_share + expert_share * (share * e if moe else 1.0)
    gemm_speed = 2.0 if cfg.fp8.format else 1.0  # FP8 GEMMs at twice the bf16 rate; attention stays bf16
    compute = step_flops * imbalance * ((1 - attention) / gemm_speed + attention) * (
        4 / 3 if recompute == "full" else 1.0) / (machine.peak_tflops * 1e12 * machine.efficiency)
    n_micro = tr.global_batch_size // (tr.micro_batch_size * dp)
    bubble = (p - 1) / ((par.virtual_pipeline or 1) * n_micro)
    dp_bandwidth = _bandwidth(t * dp, machine)
    seconds = {
        "tp": comm.tp / _bandwidth(t, machine),
        "pp": comm.pp / _bandwidth(t * dp * p, machine),
        "ep": comm.ep / _bandwidth(et * e, machine),
        "dp": comm.dp / dp_bandwidth,
    }
    if par.overlap_grad_reduce:
        seconds["dp"] -= _hidden_seconds(cfg, stage, num_experts, comm.dp_grads / dp_bandwidth,
                                         behind=compute / n_micro * 2 / 3)
    if par.overlap_param_gather:
        seconds["dp"] -= _hidden_seconds(cfg, stage, num_experts, (comm.dp - comm.dp_grads) / dp_bandwidth,
                                         behind=compute / n_micro / 3)
    step = compute * (1 + bubble) + sum(seconds.values())
    overrides = [f"parallel.tensor={t}", f"parallel.pipeline={p}"]
    if par.virtual_pipeline:
        overrides.append(f"parallel.virtual_pipeline={par.virtual_pipeline}")
    overrides += [f"parallel.expert={e}", f"parallel.expert_tensor={et}", f"training.micro_batch_size={tr.micro_batch_size}"]
    if moe and e > 1:
        overrides += [f"moe.expert_slots={cfg.moe.expert_slots}",
                      f"moe.expert_placement=[{','.join(map(str, placement.slot_of_expert))}]"]
    if recompute == "full":
        overrides += ["training.recompute_granularity=full"]
    elif recompute == "selective":
        overrides += ["training.recompute_granularity=selective"]
    return Candidate(t, p, par.virtual_pipeline, e, et, dp, tr.micro_batch_size, cfg.moe.expert_slots if moe else None,
                     bool(par.sequence_parallel), recompute, memory,
                     {k: v.total for k, v in by_recompute.items()}, comm, seconds, compute, bubble, step,
                     tokens / step / machine.world, step_flops / step / (machine.peak_tflops * 1e12),
                     memory.total <= usable, placement, overrides)


def _hidden_seconds(cfg: RunConfig, stage: int, num_experts: int, transfer: float, behind: float) -> float:
    """Of `transfer` seconds of bucketed data-parallel communication, what runs hidden behind `behind` seconds of
    compute: all but one bucket's share (the gradients' last bucket, the weights' first), at most `behind`."""
    params = stage_params(cfg, stage, num_experts)
    one_bucket = transfer * min(1.0, grad_bucket_size(cfg.parallel) / max(params.dense + params.experts, 1))
    return transfer - max(transfer - behind, one_bucket)


def plan_layouts(cfg: RunConfig, machine: Machine, num_experts: int, family_shares: Sequence[float]) -> List[Candidate]:
    """Every valid layout, best first: those that fit by estimated step time, then the rest by memory."""
    world, g = machine.world, machine.gpus_per_node
    m = cfg.model
    micro_batches = sorted({b for b in _powers_of_two(cfg.training.micro_batch_size)} | {cfg.training.micro_batch_size})
    candidates, placements = [], {}
    for t in _powers_of_two(g):
        for p in (x for x in range(1, m.num_layers + 1) if m.num_layers % x == 0 and world % (t * x) == 0):
            moe = cfg.moe.moe_last_n > 0
            interleave = [None] + [v for v in (2, 4) if p > 1 and m.num_layers % (p * v) == 0]
            for e in (_expert_sizes(num_experts, world) if moe else [1]):
                for et in (sorted({1, t}) if moe else [t]):
                    for b in micro_batches:
                        for v in interleave:
                            try:
                                layout = layout_config(cfg, world, t, p, e, et, b, num_experts, v)
                            except ConfigError:
                                continue
                            candidates.append(estimate(layout, machine, num_experts, family_shares, placements))
    # equal estimates: fewer, larger micro-batches first (they use the GPU better), then less memory
    candidates.sort(key=lambda c: (not c.fits, round(c.step_seconds, 3) if c.fits else c.memory.total, -c.micro_batch,
                                   c.memory.total))
    return candidates
