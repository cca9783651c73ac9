"""Check, at every router, that each micro-batch's family ids arrive aligned with its tokens.

    torchrun --nproc-per-node 4 family_ids_worker.py OUT_DIR RECOMPUTE [IMPLEMENTATION] [key=value ...]

RECOMPUTE: none | full | moe (selective recomputation of the MoE layer).
IMPLEMENTATION: channel (the project's) | global_variable (the hazard from the spec: ids kept in a
module-level variable set by forward_step; used to show that this check catches it).

MoE layers 2-4 of 4 put routers on both pipeline stages: on the first stage 1F1B runs other micro-
batches' forwards between a micro-batch's forward and its (recomputing) backward. Micro-batch m gets family id (2m + b + 3 * [t >= seq/2]) mod 7 at row b, position t: every micro-batch,
row and sequence half differs. Each router records the ids it receives; a tensor-parallel rank must see
exactly its sequence slice (sequence parallelism) of some micro-batch. Forward passes must see micro-
batches 0..N-1 in order, and recomputed passes (run during backward) the same micro-batches in backward
order. Each rank writes OUT_DIR/rank{r}.json with what it found.
"""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

from megatron_medmoe.config import load_stages, resolve_config  # noqa: E402
from megatron_medmoe.data.batches import causal_mask  # noqa: E402
from megatron_medmoe.model.gpt import build_model_chunks  # noqa: E402
from megatron_medmoe.model.moe_layer import FamilyMoELayer  # noqa: E402
from megatron_medmoe.model import router as router_module, routing  # noqa: E402
from megatron_medmoe.model.router import FamilyRouter  # noqa: E402
from megatron_medmoe.runtime.distributed import initialize_distributed, shutdown_distributed  # noqa: E402
from megatron_medmoe.runtime.env import detect_launch_env  # noqa: E402
from megatron_medmoe.training.loop import wrap_ddp  # noqa: E402
from megatron_medmoe.training.step import make_forward_step  # noqa: E402

NUM_MICRO, MBS = 4, 2


def family_pattern(m, seq):
    b = torch.arange(MBS)[:, None]
    t = torch.arange(seq)[None, :]
    return (2 * m + b + 3 * (t >= seq // 2).long()) % 7


def install_global_variable_hazard(forward_step, seq_slice):
    """The design the spec warns about: forward_step stores the micro-batch's ids (already split for
    sequence parallelism) in a global that the routers read."""
    current = {}
    original = FamilyRouter.forward

    def forward(self, input, family_ids=None):
        return original(self, input, current["ids"].transpose(0, 1))

    def step(data_iterator, model):
        batch = next(data_iterator)
        current["ids"] = batch["family_ids"][:, seq_slice]  # read by whichever forward runs next, recomputed or not
        return forward_step(iter([batch]), model)

    FamilyRouter.forward = forward
    return step


def main():
    out_dir, recompute = sys.argv[1], sys.argv[2]
    implementation = sys.argv[3] if len(sys.argv) > 3 and "=" not in sys.argv[3] else "channel"
    overrides = [a for a in sys.argv[3:] if "=" in a]
    granularity = {"none": "null", "full": "full", "moe": "selective"}[recompute]
    env = detect_launch_env()
    cfg = resolve_config(next(s.config for s in load_stages("examples/tiny.yaml", [
        "parallel.tensor=2", "parallel.pipeline=2", "parallel.expert=1", "moe.expert_slots=null", "moe.moe_last_n=3",
        f"training.recompute_granularity={granularity}", "training.recompute_modules=[moe]",
        f"training.micro_batch_size={MBS}", f"training.global_batch_size={MBS * NUM_MICRO}",
        "training.train_steps=1", *overrides]) if s.name == "cpt"), world_size=env.world_size)
    initialize_distributed(cfg, env)
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = build_model_chunks(cfg, 7)
    model = wrap_ddp(chunks, cfg, on_gpu=False)
    seq = cfg.data.seq_length
    calls = []
    select = routing.select_experts

    def recording_select(probs, topk, mode, training, family_ids):  # what the routing rule is given
        calls.append((recording_select.layer, torch.is_grad_enabled(), family_ids.detach().clone()))
        return select(probs, topk, mode, training, family_ids)

    for router in (m for c in chunks for m in c.modules() if isinstance(m, FamilyRouter)):
        def forward(input, family_ids=None, _router=router):
            recording_select.layer = _router.layer_number
            return type(_router).forward(_router, input, family_ids)  # the class's forward at call time
        router.forward = forward
    router_module.select_experts = recording_select

    g = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, 1000, (MBS, seq), generator=g),
                "labels": torch.randint(0, 1000, (MBS, seq), generator=g),
                "loss_mask": torch.ones(MBS, seq), "family_ids": family_pattern(m, seq),
                "position_ids": torch.arange(seq).expand(MBS, seq), "attention_mask": causal_mask(seq)}
               for m in range(NUM_MICRO)]
    tp_rank, tp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    chunk = seq // tp if cfg.parallel.sequence_parallel else seq
    start = tp_rank * chunk if cfg.parallel.sequence_parallel else 0
    forward_step = make_forward_step(7)
    if implementation == "global_variable":
        forward_step = install_global_variable_hazard(forward_step, slice(start, start + chunk))
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=model,
                                num_microbatches=NUM_MICRO, seq_length=seq, micro_batch_size=MBS, forward_only=False)

    expected = [b["family_ids"].transpose(0, 1)[start:start + chunk] for b in batches]  # [s, b] like the router
    report = {"rank": torch.distributed.get_rank(), "layers": {}}
    for layer in sorted({c[0] for c in calls}):
        seen = []
        for _, grad, ids in (c for c in calls if c[0] == layer):
            ids = ids.reshape(chunk, MBS)  # the router flattens [s, b] tokens in this order
            match = [m for m, e in enumerate(expected) if torch.equal(e, ids)]
            seen.append({"grad": grad, "micro_batch": match[0] if match else None})
        report["layers"][str(layer)] = seen
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{report['rank']}.json"), "w") as f:
        json.dump(report, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
