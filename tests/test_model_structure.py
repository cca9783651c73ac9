"""Post-MoE placement under every pipeline split, and upcycling at step 0 (spec: MoE output =
(p_a + p_b) x dense MLP output with identical experts)."""
import pytest
import torch

from megatron_medmoe.config import load_config, resolve_config
from megatron_medmoe.model.placement import expert_slots
from megatron_medmoe.model.spec import is_moe_layer_spec, post_moe_block_spec
from megatron_medmoe.model.transformer_config import build_transformer_config, moe_layer_pattern


def _cfg(*overrides):
    return resolve_config(load_config(None, ["model.vocab_size=256", "training.train_steps=0", *overrides]),
                          check_files=False)


SPLITS = [(pp, vp) for pp in (1, 2, 3, 4) for vp in (None, 2, 3) if pp > 1 or vp is None]


@pytest.mark.parametrize("num_layers, moe_last_n, pipeline, virtual", [
    (layers, moe, pp, vp) for layers, moe in [(8, 2), (8, 3), (8, 1), (8, 8), (8, 0), (6, 2), (12, 2)]
    for pp, vp in SPLITS if layers % (pp * (vp or 1)) == 0])
def test_the_last_n_layers_are_moe_under_every_pipeline_split(num_layers, moe_last_n, pipeline, virtual):
    cfg = _cfg(f"model.num_layers={num_layers}", f"moe.moe_last_n={moe_last_n}", f"parallel.pipeline={pipeline}",
               f"parallel.virtual_pipeline={virtual if virtual else 'null'}", "training.global_batch_size=48",
               "training.micro_batch_size=1")
    config = build_transformer_config(cfg, use_cpu_initialization=True)
    slots = expert_slots(7, cfg.moe.expert_slots) if moe_last_n else None
    per_layer = {}
    for pp_rank in range(pipeline):
        for vp in range(virtual or 1):
            block = post_moe_block_spec(config, False, "hybrid", slots, vp_stage=vp if virtual else None,
                                        pp_rank=pp_rank)
            per_layer_in_chunk = num_layers // (pipeline * (virtual or 1))
            first = (vp * pipeline + pp_rank) * per_layer_in_chunk  # megatron's interleaved assignment
            assert len(block.layer_specs) == per_layer_in_chunk
            for i, spec in enumerate(block.layer_specs):
                per_layer[first + i] = is_moe_layer_spec(spec)
    assert sorted(per_layer) == list(range(num_layers))
    assert [per_layer[i] for i in range(num_layers)] == [i >= num_layers - moe_last_n for i in range(num_layers)]
    assert moe_layer_pattern(num_layers, moe_last_n) == [int(per_layer[i]) for i in range(num_layers)]


def test_upcycled_moe_output_is_selected_probability_times_dense(megatron_single_rank):
    from megatron_medmoe.model.gpt import build_model_chunks
    from megatron_medmoe.model.upcycle import upcycle_state_dict

    dense = build_model_chunks(_cfg("moe.moe_last_n=0"), 7)[0]
    moe = build_model_chunks(_cfg("moe.moe_last_n=2"), 7)[0]
    state = upcycle_state_dict(dense.state_dict(), moe_layers=[2, 3], num_experts=7, hidden_size=64, seed=5)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    router = moe.decoder.layers[3].mlp.router
    assert router.weight.std().item() == pytest.approx(0.02, rel=0.15)
    x = torch.randn(16, 3, 64)
    family = torch.randint(0, 7, (3, 16))  # [batch, seq] as the model receives them
    dense_mlp = dense.decoder.layers[3].mlp
    with torch.no_grad():
        expected_unit, _ = dense_mlp(x)
        logits = x.reshape(-1, 64) @ router.weight.t()
        probs = torch.softmax(logits, -1)
        for training in (False, True):
            moe.train(training)
            out, _ = moe.decoder.layers[3].mlp(x, padding_mask=family)
            top = torch.topk(probs, 2).indices
            if training:  # hybrid: the family expert replaces the weaker pick when absent
                fam = family.transpose(0, 1).reshape(-1)
                held = (top == fam[:, None]).any(-1)
                top[:, 1] = torch.where(held, top[:, 1], fam)
            weight = probs.gather(1, top).sum(-1).reshape(16, 3, 1)
            torch.testing.assert_close(out, weight * expected_unit, rtol=1e-5, atol=1e-6)
            assert (weight < 0.75).all()  # about 2/7 of the dense output: no renormalisation
