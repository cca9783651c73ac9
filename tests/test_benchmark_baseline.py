"""The GPU benchmark's baseline model (benchmarks/baseline_model.py): a dense one matches transformers'
Qwen2ForCausalLM loaded from the same weights, its MoE block follows the hybrid-k routing rule
(checked against a per-token reference written here), and it trains (finite gradients)."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from baseline_model import BaselineConfig, BaselineForCausalLM  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("tied", [True, False])
def test_dense_matches_transformers_qwen2(tied, attn):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.Qwen2Config(**TINY, tie_word_embeddings=tied, rms_norm_eps=1e-6,
                                         rope_theta=1e6, max_position_embeddings=64, attn_implementation=attn)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_config).float().eval()
    ours = BaselineForCausalLM(BaselineConfig(**TINY, tie_word_embeddings=tied, moe_last_n=0)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    if tied:
        assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
        embedding_only = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        ours.load_state_dict(embedding_only, strict=True)  # a tied checkpoint may store the embedding only

    ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        loss, _ = ours(ids, labels=ids)
        hf_loss = hf(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)


def tiny_moe(seed=0):
    torch.manual_seed(seed)
    config = BaselineConfig(**TINY, tie_word_embeddings=False, moe_last_n=1, num_experts=4, top_k=2)
    return BaselineForCausalLM(config)


def test_parameter_names_follow_transformers_qwen2_moe():
    names = set(tiny_moe().state_dict())
    assert "model.layers.1.mlp.gate_proj.weight" in names  # dense layer
    assert "model.layers.2.mlp.gate.weight" in names  # router of the MoE layer
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.2.mlp.experts.{e}.{proj}.weight" in names
    assert "model.layers.2.mlp.experts.4.gate_proj.weight" not in names


def reference_moe(block, x, family=None):
    """Per token, with Python lists: softmax over all experts, top-2, hybrid swap, unnormalised weights."""
    out = torch.zeros_like(x)
    selections = []
    for t in range(x.shape[0]):
        p = torch.softmax(block.gate(x[t]).float(), dim=-1).tolist()
        chosen = sorted(range(len(p)), key=lambda i: -p[i])[:block.top_k]
        if family is not None and int(family[t]) not in chosen:
            chosen[-1] = int(family[t])
        selections.append(chosen)
        for e in chosen:
            out[t] += p[e] * block.experts[e](x[t])
    return out, selections


def test_moe_block_eval_is_plain_topk():
    model = tiny_moe().eval()
    block = model.model.layers[2].mlp
    x = torch.randn(2, 10, TINY["hidden_size"], generator=torch.Generator().manual_seed(2))
    family = torch.randint(0, 4, (2, 10))
    with torch.no_grad():
        got = block(x, family)  # family ids are ignored in eval
        expected, selections = reference_moe(block, x.reshape(-1, TINY["hidden_size"]))
        selected, weights = block.route(x.reshape(-1, TINY["hidden_size"]), family)
    torch.testing.assert_close(got.reshape(-1, TINY["hidden_size"]), expected, atol=1e-6, rtol=1e-5)
    assert selected.tolist() == selections
    probs = torch.softmax(block.gate(x.reshape(-1, TINY["hidden_size"])).float(), dim=-1)
    assert (weights.sum(-1) < 1).all()  # not renormalised over the top-k
    torch.testing.assert_close(weights, probs.gather(1, selected))


def test_moe_block_training_brings_in_the_family_expert():
    model = tiny_moe().train()
    block = model.model.layers[2].mlp
    tokens = 40
    x = torch.randn(tokens, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))
    family = torch.randint(0, 4, (tokens,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        selected, weights = block.route(x, family)
        plain = torch.topk(torch.softmax(block.gate(x).float(), dim=-1), 2, dim=-1).indices
        expected, selections = reference_moe(block, x, family)
        got = block(x.unsqueeze(0), family.unsqueeze(0)).squeeze(0)

    assert (selected == family[:, None]).any(-1).all()
    held = (plain == family[:, None]).any(-1)
    assert held.any() and (~held).any()  # both cases occur in this draw
    assert torch.equal(selected[held], plain[held])
    assert torch.equal(selected[~held, 0], plain[~held, 0])  # the stronger pick stays
    assert selected.tolist() == selections
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

    block.hybrid = False
    with torch.no_grad():
        assert torch.equal(block.route(x, family)[0], plain)


def test_backward_gives_finite_grads():
    model = tiny_moe().train()
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    family = torch.randint(0, 4, (2, 16))
    loss, logits = model(ids, family_ids=family, labels=ids)
    assert logits.shape == (2, 16, TINY["vocab_size"])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    block = model.model.layers[2].mlp
    for name, param in [("router", block.gate.weight)] + [
            (f"expert {e} {n}", p) for e, expert in enumerate(block.experts) for n, p in expert.named_parameters()]:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert block.gate.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad is not None
