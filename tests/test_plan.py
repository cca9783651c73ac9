"""`medmoe plan`: the memory and communication arithmetic against hand-computed small cases, expert placement
on a skewed mix against every possible placement, the mix read from data, and the command's answers."""
import itertools
import json

import pytest

from conftest import REPO, TINY, run_medmoe
from megatron_medmoe.config import load_config, load_stages, resolve_config
from megatron_medmoe.config.validate import grad_bucket_size
from megatron_medmoe.languages import load_registry
from megatron_medmoe.plan.comm import step_comm
from megatron_medmoe.plan.memory import stage_memory, stage_params
from megatron_medmoe.plan.mix import MixError, shares_from_data, shares_from_mix
from megatron_medmoe.plan.placement import balance_experts, expert_loads

# 2 layers (layer 0 dense, layer 1 MoE with the 7 family experts), hidden 16, ffn 32, 4 heads of 4, 2 kv heads,
# vocabulary 64, untied, 8 tokens x micro-batch 2, bf16
SMALL = ["model.num_layers=2", "model.hidden_size=16", "model.ffn_hidden_size=32", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.vocab_size=64", "model.make_vocab_size_divisible_by=64",
         "model.tie_embeddings=false", "moe.moe_last_n=1", "moe.topk=2", "data.seq_length=8",
         "training.micro_batch_size=2", "training.precision=bf16", "data.datasets=[{prefix: none}]"]


def small(*overrides, world_size=None):
    return resolve_config(load_config(None, SMALL + list(overrides)), world_size=world_size, check_files=False)


def test_memory_of_one_gpu_by_hand():
    cfg = small("training.global_batch_size=2")
    # attention: q/k/v 16 x (4 + 2 + 2) x 4 = 512, output 16 x 16 = 256, q/k/v bias 32, input norm 16; pre-MLP norm 16
    # dense MLP 3 x 16 x 32 = 1536; router 16 x 7 = 112; experts 7 x 1536 = 10752
    # embedding and output layer 64 x 16 = 1024 each, final norm 16
    params = stage_params(cfg, 0, 7)
    assert params.dense == (832 + 1536) + (832 + 112) + 1024 + 1024 + 16 == 5376
    assert params.experts == 10752 and params.frozen == 0
    mem = stage_memory(cfg, 0, 7)
    assert mem.weights == 2 * 16128 and mem.gradients == 4 * 16128 and mem.optimizer == 12 * 16128
    # activations, s b = 16 tokens: attention 2 x 16 x 16 (norm input, q/k/v input) + 16 x (16 + 8 + 8) (q, k, v)
    # + 16 x 16 (output) + 2 x 16 x 4 (softmax statistics) = 1408; dense MLP 2 x 256 + 3 x 16 x 32 = 2048;
    # MoE MLP 2 x 256 + 4 x 16 x 7 (router) + 2 x 16 copies x (2 x 16 + 3 x 32) = 4096 -> 5056
    assert mem.activations == 2 * (1408 + 2048 + 1408 + 5056)
    assert mem.logits == 6 * 16 * 64 + 4 * 16 * 16  # bf16 logits + float32 copy; final-norm and output inputs
    assert mem.in_flight == 1
    assert mem.total == 32256 + 64512 + 193536 + 19840 + 7168


def test_layouts_split_the_memory_as_megatron_core_does():
    tp2 = stage_memory(small("parallel.tensor=2", "training.global_batch_size=2"), 0, 7)
    # tensor parallel 2: GEMM weights and vocabulary halve, biases split, norms and router replicated
    # attention 768 / 2 + 32 / 2 + 16, pre-MLP norm 16, dense MLP 768, router 112, experts 7 x 768 (expert tensor
    # parallel follows tensor parallel); vocabulary 512 x 2; final norm 16
    assert tp2.weights == 2 * ((416 + 16 + 768) + (416 + 16 + 112) + 1024 + 16 + 7 * 768)
    # sequence parallelism splits the norm inputs too: attention 1408 -> 2 x 128 + 16 x 16 + 128 + 64 = 704
    assert tp2.activations == 2 * ((704 + 256 + 768) + (704 + 256 + 224 + 32 * (32 + 48)))

    pp = small("parallel.pipeline=2", "training.global_batch_size=8")  # 4 micro-batches per step
    first, last = stage_memory(pp, 0, 7), stage_memory(pp, 1, 7)
    assert (first.in_flight, last.in_flight) == (2, 1)  # 1F1B: stage i holds min(p - i, M)
    assert first.weights == 2 * (2368 + 1024) and first.logits == 0
    assert last.weights == 2 * (944 + 10752 + 1024 + 16) and last.logits == 7168
    assert first.activations == 2 * 2 * 3456 and last.activations == 2 * 6464

    # interleaved, 4 layers (the last MoE) on 2 ranks x 2 chunks: rank 0 holds layers 0 and 2, rank 1 layers 1
    # and 3; with 4 micro-batches rank 0 warms up (2 - 0 - 1) x 2 + (2 - 1) x 2 = 4 chunks, holding 5 at its
    # peak, rank 1 holds 3; each chunk is half the rank's layers
    vp = small("model.num_layers=4", "parallel.pipeline=2", "parallel.virtual_pipeline=2",
               "training.global_batch_size=8")
    first, last = stage_memory(vp, 0, 7), stage_memory(vp, 1, 7)
    assert (first.in_flight, last.in_flight) == (5, 3)
    assert first.activations == 2 * (3456 + 3456) * 5 / 2 and last.activations == 2 * (3456 + 6464) * 3 / 2
    assert step_comm(vp, 0, 7).pp == 4 * 2 * 2 * 256 * 2  # every chunk sends forward and backward

    full = stage_memory(small("training.global_batch_size=2"), 0, 7, recompute="full")
    assert full.activations == 2 * (2 * 16 * 16 + 6464)  # each layer's input, and one layer recomputed

    dp = small("parallel.expert=2", "moe.expert_slots=8", "training.global_batch_size=4", world_size=2)
    mem = stage_memory(dp, 0, 7)  # 2 ranks: data parallel 2, experts 4 slots a rank (one padding slot on one)
    assert mem.optimizer == 12 * (5376 / 2 + 4 * 1536 / 1)
    assert mem.weights == 2 * (5376 + 4 * 1536) and mem.gradients == 4 * (5376 + 4 * 1536)
    assert stage_memory(dp, 0, 7, expert_rank_share=0.75).activations > mem.activations


def test_communication_by_hand():
    cfg = small("parallel.tensor=2", "training.global_batch_size=6")  # 3 micro-batches a step
    comm = step_comm(cfg, 0, 7)
    sbh = 8 * 2 * 16
    # per micro-batch, in halves of s b h bf16 values: dense layer 8 (attention and MLP, forward and backward),
    # MoE layer 4 (attention; its experts are expert-tensor traffic), embedding 2, output layer 2
    assert comm.tp == 3 * (8 + 4 + 2 + 2) * 0.5 * sbh * 2
    # experts (expert tensor parallel 2 = tensor): 4 gathers/scatters of the 2 x 8 copies of the GPU's 8 tokens
    assert comm.ep == 3 * 4 * 0.5 * (16 * 2) * 16 * 2
    assert comm.pp == 0 and comm.dp == 0
    again = step_comm(cfg, 0, 7, recompute="full")  # the forward collectives once more
    assert again.tp == 3 * (12 + 6 + 2 + 2) * 0.5 * sbh * 2 and again.ep == comm.ep * 6 / 4

    pp = small("parallel.pipeline=2", "training.global_batch_size=8")
    assert step_comm(pp, 0, 7).pp == 4 * 1 * sbh * 2  # stage 0 sends activations only

    ep = small("parallel.expert=2", "moe.expert_slots=8", "training.global_batch_size=4", world_size=2)
    comm = step_comm(ep, 0, 7)
    assert comm.ep == 1 * 1 * 4 * 0.5 * (2 * 16) * 16 * 2  # 1 micro-batch, 1 MoE layer, 4 all-to-alls of k s b h
    # distributed optimizer: fp32 gradients reduce-scattered, bf16 weights gathered, over data parallel 2;
    # experts have expert-data-parallel 1: nothing
    assert comm.dp == 0.5 * 5376 * 6


def test_balanced_placement_of_a_skewed_mix_is_the_best_there_is():
    shares = [0.06, 0.05, 0.03, 0.02, 0.70, 0.10, 0.04]  # Indo-European carries most tokens
    loads = expert_loads(shares, topk=2, routing="hybrid")
    assert sum(loads) == pytest.approx(1.0)
    assert loads[4] == pytest.approx((0.70 + 0.30 / 6) / 2)
    for ranks, slots in ((2, 8), (4, 8), (7, 7)):
        placement = balance_experts(loads, ranks, slots)
        per_rank = slots // ranks
        best = min(max(sum(loads[i] for i in range(7) if owner[i] == r) for r in range(ranks))
                   for owner in itertools.product(range(ranks), repeat=7)
                   if all(owner.count(r) <= per_rank for r in range(ranks)))
        assert placement.max_load == pytest.approx(best)
        identity = max(sum(loads[i] for i in range(7) if i // per_rank == r) for r in range(ranks))
        assert placement.max_load <= identity
        slot_of_expert = placement.slot_of_expert
        assert sorted(slot_of_expert) == sorted(set(slot_of_expert)) and max(slot_of_expert) < slots
        assert all(slot_of_expert[i] // per_rank == r for r, g in enumerate(placement.experts_of_rank) for i in g)
    two = balance_experts(loads, 2, 8)
    assert two.max_load < max(sum(loads[:4]), sum(loads[4:]))  # better than expert i in slot i
    assert expert_loads(shares, topk=1, routing="hybrid") == pytest.approx(shares)


def test_mix_from_options_and_from_the_recipes_data(monkeypatch):
    monkeypatch.chdir(REPO)
    registry = load_registry("families")
    shares = shares_from_mix(["en=3", "zh=1", "Kongolese=4", "de=2"], registry)
    assert shares[4] == pytest.approx(0.5) and shares[0] == pytest.approx(0.1) and shares[6] == pytest.approx(0.4)
    for bad in (["xx=1"], ["en"], ["en=-1"], ["en=0"]):
        with pytest.raises(MixError, match="--mix"):
            shares_from_mix(bad, registry)
    cfg = next(s.config for s in load_stages(TINY, []) if s.name == "cpt")
    summary = json.loads((REPO / "runs" / "data" / "tiny_text.json").read_text())
    # one dataset, weighted sampling: one pass of the plan draws every document once
    expected = [summary["per_family"].get(name, {}).get("tokens", 0) / summary["tokens"] for name in registry.experts]
    assert shares_from_data(cfg, registry) == pytest.approx(expected)
    cfg.data.datasets[0].prefix = "runs/data/missing"
    with pytest.raises(MixError, match="runs/data/missing.json not found.*--mix"):
        shares_from_data(cfg, registry)


MIX = ["--mix", "en=1.08e9", "zh=7.8e8", "fr=1e8", "es=1e8", "de=8e7", "ru=8e7", "ja=8e7", "ko=6e7", "hi=5e7",
       "ar=5e7", "it=5e7", "pt=5e7"]


def test_plan_command_json_layouts_are_valid_recipes():
    proc = run_medmoe(["plan", "--recipe", "examples/apollomoe-0.5b.yaml", "--nodes", "2", "--gpus-per-node", "8",
                       "--gpu-memory", "80GB", *MIX, "--json"], timeout=300)
    answer = json.loads(proc.stdout)
    layouts = answer["layouts"]
    assert answer["gpus_per_node"] == 8 and answer["family_shares"]["Indo-European"] > 0.5
    assert layouts[0]["fits"] and all(round(a["step_seconds"], 3) <= round(b["step_seconds"], 3)
                                      for a, b in zip(layouts, layouts[1:]) if a["fits"] and b["fits"])
    usable = answer["usable_bytes"]
    assert all((lay["memory"]["total"] <= usable) == lay["fits"] for lay in layouts)
    for lay in layouts[:5]:  # what the planner suggests passes `medmoe train`'s own validation on 16 ranks
        stage = load_stages(str(REPO / "examples" / "apollomoe-0.5b.yaml"), lay["overrides"])[0]
        cfg = resolve_config(stage.config, world_size=16, check_files=False)
        assert (cfg.parallel.tensor, cfg.parallel.expert, cfg.parallel.data) == (
            lay["tensor"], lay["expert"], lay["data"])
    with_ep = next(lay for lay in layouts if lay["expert"] == 8)
    placement = with_ep["expert_placement"]
    assert sum(placement["rank_loads"]) == pytest.approx(1.0)
    assert len(placement["slot_of_expert"]) == 7 and sorted(placement["rank_loads"])[-1] < 0.5


def plan(capsys, *args):
    """`medmoe plan ARGS` in this process: (exit code, stdout, stderr)."""
    from megatron_medmoe.cli import main

    with pytest.raises(SystemExit) as done:
        main(["plan", *args])
    out, err = capsys.readouterr()
    return done.value.code, out, err


def test_plan_command_table_and_bad_input(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, _ = plan(capsys, "--recipe", "examples/apollomoe-1.5b.yaml", "--nodes", "1", "--gpus-per-node", "8",
                        *MIX, "--top", "3")
    assert code == 0 and "valid layouts fit" in out
    assert "best: medmoe train examples/apollomoe-1.5b.yaml parallel.tensor=" in out
    assert len([line for line in out.splitlines() if line.strip()[:2] in ("1 ", "2 ", "4 ", "8 ")]) == 3
    code, _, err = plan(capsys, "--recipe", "examples/apollomoe-0.5b.yaml", "--nodes", "0", "--gpus-per-node", "8")
    assert code == 2 and "--nodes: '0': expected a whole number of at least 1" in err
    code, _, err = plan(capsys, "--recipe", "examples/apollomoe-0.5b.yaml", "--nodes", "1", "--gpus-per-node", "8",
                        "--gpu-memory", "lots")
    assert code == 2 and "expected a size such as 80GB" in err
    code, out, err = plan(capsys, "--recipe", "examples/apollomoe-0.5b.yaml", "--nodes", "1", "--gpus-per-node", "8")
    assert code == 3 and "data/apollomoe/train.json not found" in err and "--mix" in err and out == ""
    code, out, _ = plan(capsys, "--recipe", "examples/apollomoe-0.5b.yaml", "--nodes", "1", "--gpus-per-node", "8",
                        "--mix", "en=1", "zh=1", "fp8.format=hybrid", "--json")  # an override after --mix
    assert code == 0 and json.loads(out)["family_shares"]["Sino-Tibetan"] == pytest.approx(0.5)
    code, out, err = plan(capsys, "--recipe", "examples/apollomoe-0.5b.yaml", "--nodes", "1", "--gpus-per-node", "8",
                          "--mix", "en=1", "klingon=2")
    assert code == 2 and "'klingon' is neither a family" in err
    code, out, _ = plan(capsys, "--recipe", "examples/tiny.yaml", "--nodes", "1", "--gpus-per-node", "2",
                        "--gpu-memory", "1MB")
    assert code == 0 and "none fits in 0.001 GB (smallest shown)" in out
    # a GPU model brings its memory, peak and NVLink; one without FP8 tensor cores refuses an FP8 recipe
    code, out, _ = plan(capsys, "--recipe", "examples/apollomoe-0.5b.yaml", "--nodes", "1", "--gpus-per-node", "8",
                        "--mix", "en=1", "--gpu", "h200", "--json")
    assert code == 0 and json.loads(out)["gpu_memory_bytes"] == 141e9 and json.loads(out)["gpu"] == "NVIDIA H200 SXM"
    code, out, err = plan(capsys, "--recipe", "examples/apollomoe-0.5b.yaml", "--nodes", "1", "--gpus-per-node", "8",
                          "--mix", "en=1", "--gpu", "a100", "fp8.format=e4m3")
    assert code == 2 and "A100 SXM 80GB (compute capability 8.0) has no FP8 tensor cores" in err and out == ""


def test_fp8_shortens_the_estimated_compute_by_the_gemm_share():
    from megatron_medmoe.plan.layouts import Machine, estimate

    machine = Machine(1, 1, 80e9)
    bf16 = estimate(small("training.global_batch_size=2"), machine, 7, [1 / 7] * 7, {})
    fp8 = estimate(small("training.global_batch_size=2", "fp8.format=hybrid"), machine, 7, [1 / 7] * 7, {})
    # multiply-adds a token: 2 layers x (projections 768 + scores and values 2 x 8 x 16) + dense MLP 1536 +
    # router 112 + 2 experts x 1536 + output layer 16 x 64 = 7792, of which scores and values (512) stay bf16
    attention = 512 / 7792
    assert fp8.compute_seconds == pytest.approx(bf16.compute_seconds * ((1 - attention) / 2 + attention))
    # one GPU, nothing to communicate, no bubble: the expected MFU is the assumed efficiency, FP8's against bf16's peak
    assert bf16.mfu == pytest.approx(machine.efficiency)
    assert fp8.mfu == pytest.approx(machine.efficiency / ((1 - attention) / 2 + attention))
    assert fp8.memory.weights > bf16.memory.weights  # TransformerEngine's FP8 weight copies


def test_overlapped_gradient_reduction_hides_all_but_the_last_bucket():
    from megatron_medmoe.plan.layouts import Machine, estimate

    layout = ("training.global_batch_size=8", "parallel.expert=1", "moe.expert_slots=null")  # DP 2, 2 micro-batches
    params = stage_params(small(*layout, world_size=2), 0, 7)
    on_gpu = params.dense + params.experts  # experts too: expert-data-parallel 2
    bucket = on_gpu // 4
    off = small(*layout, world_size=2)
    on = small(*layout, "parallel.overlap_grad_reduce=true", f"parallel.ddp_bucket_size={bucket}", world_size=2)
    assert step_comm(on, 0, 7).dp_grads == 0.5 * on_gpu * 4  # fp32 gradients reduce-scattered over 2
    assert grad_bucket_size(off.parallel) is None  # one bucket, after the backward pass
    assert grad_bucket_size(small(*layout, "parallel.overlap_grad_reduce=true", world_size=2).parallel) == 40_000_000
    for gbps in (1e-6, 1e6):  # the network slower than the backward pass, then much faster
        machine = Machine(1, 2, 80e9, nvlink_gbps=gbps)
        plain, overlapped = (estimate(c, machine, 7, [1 / 7] * 7, {}) for c in (off, on))
        grads = 0.5 * on_gpu * 4 / (gbps * 1e9)
        backward = plain.compute_seconds / 2 * 2 / 3  # the last of 2 micro-batches
        hidden = min(grads * (1 - bucket / on_gpu), backward)
        assert plain.comm_seconds["dp"] - overlapped.comm_seconds["dp"] == pytest.approx(hidden, rel=1e-9)
        assert hidden == pytest.approx(backward if gbps < 1 else grads * (1 - bucket / on_gpu))


def test_overlapped_weight_gathering_hides_all_but_the_first_bucket():
    from megatron_medmoe.plan.layouts import Machine, estimate

    layout = ("training.global_batch_size=8", "parallel.expert=1", "moe.expert_slots=null", "training.precision=bf16",
              "parallel.overlap_grad_reduce=true")
    params = stage_params(small(*layout, world_size=2), 0, 7)
    on_gpu = params.dense + params.experts
    bucket = on_gpu // 4
    grads_only = small(*layout, f"parallel.ddp_bucket_size={bucket}", world_size=2)
    both = small(*layout, f"parallel.ddp_bucket_size={bucket}", "parallel.overlap_param_gather=true", world_size=2)
    comm = step_comm(both, 0, 7)
    assert comm.dp - comm.dp_grads == 0.5 * on_gpu * 2  # bf16 weights all-gathered over 2
    for gbps in (1e-6, 1e6):
        machine = Machine(1, 2, 80e9, nvlink_gbps=gbps)
        before, after = (estimate(c, machine, 7, [1 / 7] * 7, {}) for c in (grads_only, both))
        weights = 0.5 * on_gpu * 2 / (gbps * 1e9)
        forward = before.compute_seconds / 2 / 3  # the first of 2 micro-batches
        hidden = min(weights * (1 - bucket / on_gpu), forward)
        assert before.comm_seconds["dp"] - after.comm_seconds["dp"] == pytest.approx(hidden, rel=1e-9)
        assert after.step_seconds < before.step_seconds


def test_attention_memory_is_planned_for_the_layers_the_machine_builds(monkeypatch):
    """model.transformer_impl=auto builds TransformerEngine layers (fused attention) only where TE imports on a
    GPU; a GPU without TE runs local layers, whose unfused attention keeps the s x s scores of every head."""
    from megatron_medmoe.model import backend
    from megatron_medmoe.plan.memory import activation_elements

    import torch

    cfg = small("training.global_batch_size=2")
    s, b, a = cfg.data.seq_length, cfg.training.micro_batch_size, cfg.model.num_attention_heads
    sizes = {}
    for impl in ("local", "transformer_engine"):
        cfg.model.transformer_impl = impl
        sizes[impl] = activation_elements(cfg, False, None, 1.0)
    assert sizes["local"] - sizes["transformer_engine"] == pytest.approx(s * b * a * s)
    cfg.model.transformer_impl = "auto"
    assert activation_elements(cfg, False, None, 1.0) == sizes["transformer_engine"]  # no GPU here: planned as TE
    assert "no GPU here" in backend.planned_layers("auto")[1]
    backend.planned_layers.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend, "_transformer_engine_problem", lambda: "import transformer_engine.pytorch failed")
    try:
        assert activation_elements(cfg, False, None, 1.0) == sizes["local"]  # a GPU without TransformerEngine
        assert "local layers on this machine" in backend.planned_layers("auto")[1]
    finally:
        backend.planned_layers.cache_clear()
