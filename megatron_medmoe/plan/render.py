"""The planner's answer as a table for people or JSON for scripts."""
from __future__ import annotations

from typing import List

from .layouts import Candidate
from .memory import GiB
from .placement import expert_loads

ASSUMPTIONS = ("memory: weights in the training precision, fp32 gradient buffer, distributed optimizer (fp32 main "
               "weights + Adam moments over the data-parallel group), activations of the micro-batches 1F1B holds, "
               "logits on the last stage; {reserve:.0f} GiB a GPU kept for CUDA, NCCL and the allocator. time: "
               "model FLOPs at {eff:.0%} of {peak:.0f} TFLOP/s (FP8 GEMMs twice that), communication not overlapped (but with "
               "parallel.overlap_grad_reduce the gradient reduction, during the last micro-batch's backward pass, and with "
               "parallel.overlap_param_gather the weights' all-gather, during the first forward pass), {nv:.0f} GB/s "
               "per GPU in a node, {net:.0f} GB/s between nodes.")


def _gib(x: float) -> str:
    return f"{x / GiB:.1f}"


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def render_table(candidates: List[Candidate], top: int, *, recipe, stage, machine, shares, share_source, registry,
                 cfg, layers) -> str:
    fitting = [c for c in candidates if c.fits]
    lines = [f"{recipe}{f' (stage {stage})' if stage else ''} on {machine.nodes} node(s) x {machine.gpus_per_node} "
             f"{machine.gpu}, {machine.gpu_memory / 1e9:g} GB each: {len(fitting)} of {len(candidates)} valid layouts fit",
             ""]
    header = ("TP", "PP", "VP", "EP", "ETP", "DP", "mbs", "recompute", "weights", "grads", "optim", "activ", "logits",
              "total GiB", "no-recomp GiB", "TP GB", "PP GB", "EP GB", "DP GB", "step s", "tok/s/GPU", "MFU")
    rows = []
    for c in (fitting or candidates)[:top]:
        mem = c.memory
        rows.append((c.tensor, c.pipeline, c.virtual_pipeline or "-", c.expert, c.expert_tensor, c.data, c.micro_batch, c.recompute or "none",
                     _gib(mem.weights), _gib(mem.gradients), _gib(mem.optimizer), _gib(mem.activations),
                     _gib(mem.logits), _gib(mem.total), _gib(c.memory_by_recompute["none"]), _gb(c.comm.tp),
                     _gb(c.comm.pp), _gb(c.comm.ep), _gb(c.comm.dp), f"{c.step_seconds:.2f}",
                     f"{c.tokens_per_s_per_gpu:,.0f}", f"{c.mfu:.0%}"))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines.append("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(str(x).rjust(w) for x, w in zip(row, widths)) for row in rows]
    if not fitting:
        lines += ["", f"none fits in {machine.gpu_memory / 1e9:g} GB (smallest shown): add GPUs, lower "
                      "training.micro_batch_size or shorten data.seq_length"]
    lines += ["", "memory per GPU of its busiest pipeline stage; communication: GB each GPU sends per step"]
    if cfg.moe.moe_last_n > 0:
        best = (fitting or candidates)[0]
        lines += ["", _placement_text(best, shares, share_source, registry, cfg)]
    lines += ["", f"best: medmoe train {recipe} {' '.join((fitting or candidates)[0].overrides)}",
              "", f"layers: {layers}", "assumptions: " + _assumptions(machine)]
    return "\n".join(lines)


def _placement_text(best: Candidate, shares, share_source, registry, cfg) -> str:
    names = registry.experts
    mix = ", ".join(f"{names[i]} {s:.1%}" for i, s in sorted(enumerate(shares), key=lambda x: -x[1]))
    out = [f"token share per family ({share_source}): {mix}"]
    if best.expert == 1:
        out.append("expert parallel 1: every GPU holds all experts, nothing to place")
        return "\n".join(out)
    loads = expert_loads(shares, cfg.moe.topk, cfg.moe.routing)
    identity = balance_identity(loads, best.expert, best.expert_slots)
    out.append(f"expert placement on {best.expert} expert-parallel ranks ({best.expert_slots} slots): busiest rank "
               f"{best.placement.max_load:.1%} of routed tokens (expert i in slot i: {identity:.1%}; even: "
               f"{1 / best.expert:.1%})")
    for rank, (experts, load) in enumerate(zip(best.placement.experts_of_rank, best.placement.rank_loads)):
        out.append(f"  rank {rank}: {', '.join(names[i] for i in experts) or '(padding)'}  {load:.1%}")
    out.append(f"  moe.expert_slots={best.expert_slots} moe.expert_placement="
               f"[{','.join(map(str, best.placement.slot_of_expert))}]")
    return "\n".join(out)


def balance_identity(loads, ranks: int, slots: int) -> float:
    """Busiest rank's load when expert i sits in slot i (the default placement)."""
    per_rank = slots // ranks
    return max(sum(loads[i] for i in range(len(loads)) if i // per_rank == r) for r in range(ranks))


def _assumptions(machine) -> str:
    return ASSUMPTIONS.format(reserve=machine.reserve / GiB, eff=machine.efficiency, peak=machine.peak_tflops,
                              nv=machine.nvlink_gbps, net=machine.network_gbps)


def to_json(candidates: List[Candidate], *, recipe, stage, machine, shares, share_source, registry, cfg, layers) -> dict:
    return {
        "recipe": recipe, "stage": stage, "nodes": machine.nodes, "gpus_per_node": machine.gpus_per_node, "gpu": machine.gpu,
        "gpu_memory_bytes": machine.gpu_memory, "usable_bytes": machine.gpu_memory - machine.reserve,
        "family_shares": {registry.experts[i]: s for i, s in enumerate(shares)} if cfg.moe.moe_last_n else {},
        "share_source": share_source, "layers": layers, "assumptions": _assumptions(machine),
        "layouts": [c.as_dict() for c in candidates],
    }
