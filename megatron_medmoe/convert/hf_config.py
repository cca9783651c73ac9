"""Hugging Face config.json <-> our model and MoE settings, for Qwen2, Qwen2-MoE and ApolloMoE.

What our model cannot express is refused by field name rather than converted into something else:
renormalised top-k, MoE layers that are not the last ones, sliding-window
attention, rotary scaling, another activation.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .errors import ConvertError

QWEN2, QWEN2_MOE, APOLLO_MOE = "qwen2", "qwen2_moe", "upcycling-qwen2-moe"
FORMATS = {"qwen2": QWEN2, "qwen2_moe": QWEN2_MOE, "apollo_moe": APOLLO_MOE}  # --format -> model_type
TABLE_BY_EXPERTS = {7: "families", 12: "languages12"}


@dataclass
class HFModel:
    """A Hugging Face model's shape in our terms."""
    model_type: str
    model: Dict[str, Any]  # ModelConfig fields
    moe: Dict[str, Any] = field(default_factory=dict)  # MoEConfig fields (moe_last_n 0: dense)
    num_experts: int = 0
    dtype: Optional[str] = None  # torch_dtype of the checkpoint, e.g. bfloat16


def read_config(directory: str) -> Dict[str, Any]:
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path} does not exist: not a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read it as JSON ({e})") from e


def _rope_theta(cfg: Dict[str, Any], path: str) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConvertError(f"{path}: rope type {kind!r} (rope_parameters/rope_scaling) is not supported: "
                           "only plain rotary embeddings")
    return float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))


def parse_config(cfg: Dict[str, Any], directory: str) -> HFModel:
    path = os.path.join(directory, "config.json")
    model_type = cfg.get("model_type")
    if model_type not in (QWEN2, QWEN2_MOE, APOLLO_MOE):
        raise ConvertError(f"{path}: model_type {model_type!r} is not supported; supported: {QWEN2}, {QWEN2_MOE}, "
                           f"{APOLLO_MOE} (ApolloMoE)")

    def need(key):
        if key not in cfg:
            raise ConvertError(f"{path}: field {key!r} is missing")
        return cfg[key]

    def refuse_unless(ok, key, why):
        if not ok:
            raise ConvertError(f"{path}: {key}={cfg.get(key)!r} cannot be converted: {why}")

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    refuse_unless(cfg.get("hidden_act", "silu") == "silu", "hidden_act", "the model's MLP is SwiGLU (silu)")
    refuse_unless(not cfg.get("use_sliding_window", False), "use_sliding_window", "attention is full-length")
    refuse_unless(cfg.get("head_dim") in (None, hidden // heads), "head_dim", "head size must be hidden_size / heads")
    refuse_unless(cfg.get("qkv_bias", True), "qkv_bias", "Qwen2 attention has q/k/v biases")
    layers = need("num_hidden_layers")
    model = {
        "num_layers": layers, "hidden_size": hidden, "ffn_hidden_size": need("intermediate_size"),
        "num_attention_heads": heads, "num_query_groups": cfg.get("num_key_value_heads") or heads,
        "vocab_size": need("vocab_size"), "max_position_embeddings": cfg.get("max_position_embeddings", 32768),
        "rotary_base": _rope_theta(cfg, path), "norm_epsilon": cfg.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }
    out = HFModel(model_type, model, {"moe_last_n": 0}, 0, cfg.get("torch_dtype") or cfg.get("dtype"))
    if model_type == QWEN2:
        return out
    experts = need("num_experts")
    refuse_unless(cfg.get("decoder_sparse_step", 1) == 1, "decoder_sparse_step", "MoE layers are consecutive")
    refuse_unless(not cfg.get("norm_topk_prob", False), "norm_topk_prob",
                  "routing weights are the softmax over all experts, not renormalised over the top k")
    dense = sorted(cfg.get("mlp_only_layers") or [])
    refuse_unless(dense == list(range(len(dense))), "mlp_only_layers",
                  "Post-MoE keeps the first layers dense and makes the last ones MoE")
    if model_type == APOLLO_MOE:
        refuse_unless(not cfg.get("share_flag", False), "share_flag",
                      "the released ApolloMoE layout has no shared expert; its tensors are not defined")
    out.moe = {"moe_last_n": layers - len(dense), "topk": need("num_experts_per_tok"),
               "expert_ffn_hidden_size": cfg.get("moe_intermediate_size") or model["ffn_hidden_size"]}
    if model_type == QWEN2_MOE and cfg.get("shared_expert_intermediate_size"):  # megatron-core's gated shared expert
        out.moe["shared_expert_ffn_hidden_size"] = cfg["shared_expert_intermediate_size"]
    if model_type == APOLLO_MOE:
        out.moe["routing"] = "hybrid" if cfg.get("language_gate", True) else "topk"
    out.num_experts = experts
    return out


def hf_config(cfg, num_experts: int, model_type: str, dtype: str, bos: Optional[int], eos: Optional[int]) -> Dict:
    """config.json for our RunConfig `cfg` in one of the three formats."""
    m, moe = cfg.model, cfg.moe
    out: Dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": QWEN2, "hidden_act": "silu",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups, "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon, "rope_theta": m.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rotary_base},
        "tie_word_embeddings": m.tie_embeddings, "attention_dropout": 0.0, "initializer_range": m.init_method_std,
        "use_cache": True, "use_sliding_window": False, "sliding_window": None, "max_window_layers": m.num_layers,
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": dtype, "dtype": dtype,
    }
    if model_type == QWEN2:
        return out
    dense_layers = m.num_layers - moe.moe_last_n
    out.update({
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": QWEN2_MOE, "num_experts": num_experts,
        "num_experts_per_tok": moe.topk, "moe_intermediate_size": moe.expert_ffn_hidden_size or m.ffn_hidden_size,
        "shared_expert_intermediate_size": moe.shared_expert_ffn_hidden_size or 0, "norm_topk_prob": False, "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(dense_layers)), "qkv_bias": True, "output_router_logits": False,
        "router_aux_loss_coef": moe.aux_loss_coeff,
    })
    if model_type == APOLLO_MOE:
        out.update({"architectures": ["UpcyclingQwen2MoeForCausalLM"], "model_type": APOLLO_MOE,
                    "language_gate": moe.routing != "topk", "share_flag": False})
        out.pop("shared_expert_intermediate_size")
    return out
