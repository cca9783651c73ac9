"""Upcycle a dense Qwen2-style model into Post-MoE, as the spec says.

Attention, norms, embeddings and the output layer are copied unchanged; dense layers keep their MLP;
in each MoE layer every expert is an exact copy of that layer's dense gate/up (linear_fc1) and down
(linear_fc2) projections, and the router is fresh, normal(0, router_std) from a seed.

Works on megatron-core state dicts of a single-rank model (TP = PP = EP = 1), the layout-free form in
which converted checkpoints are written; dist_checkpointing reshards them afterwards.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable

import torch

_DENSE_MLP = re.compile(r"^(?P<layer>(?:.*\.)?decoder\.layers\.(?P<index>\d+)\.)mlp\.(?P<rest>linear_fc[12]\..+)$")
# TransformerEngine's dense layers fuse the pre-MLP norm into linear_fc1; MoE layers keep it separate
_FUSED_NORM = re.compile(r"^(?P<layer>(?:.*\.)?decoder\.layers\.(?P<index>\d+)\.)mlp\.linear_fc1\.layer_norm_(?P<p>weight|bias)$")


def upcycle_state_dict(dense: Dict[str, torch.Tensor], moe_layers: Iterable[int], num_experts: int,
                       hidden_size: int, seed: int, router_std: float = 0.02) -> Dict[str, torch.Tensor]:
    """dense: state dict of the dense model; moe_layers: 0-based indices of the layers to make MoE."""
    moe_layers = set(moe_layers)
    out: Dict[str, torch.Tensor] = {}
    layer_prefix: Dict[int, str] = {}
    for key, value in dense.items():
        norm = _FUSED_NORM.match(key)
        if norm and int(norm.group("index")) in moe_layers:
            out[f"{norm.group('layer')}pre_mlp_layernorm.{norm.group('p')}"] = value.clone()
            continue
        mlp = _DENSE_MLP.match(key)
        if mlp and int(mlp.group("index")) in moe_layers:
            layer_prefix[int(mlp.group("index"))] = mlp.group("layer")
            if mlp.group("rest").endswith("_extra_state"):
                continue
            for expert in range(num_experts):
                out[f"{mlp.group('layer')}mlp.experts.local_experts.{expert}.{mlp.group('rest')}"] = value.clone()
            continue
        out[key] = value
    missing = sorted(moe_layers - layer_prefix.keys())
    if missing:
        raise ValueError(f"the dense state dict has no decoder.layers.N.mlp weights for layers {missing}")
    for index, weight in fresh_routers(moe_layers, num_experts, hidden_size, seed, router_std).items():
        out[f"{layer_prefix[index]}mlp.router.weight"] = weight
    return out


def fresh_routers(moe_layers: Iterable[int], num_experts: int, hidden_size: int, seed: int,
                  router_std: float = 0.02) -> Dict[int, torch.Tensor]:
    """Router weights ~ normal(0, router_std), drawn from one generator seeded with `seed`, layer by layer in
    increasing order (so the same seed gives the same routers whichever code upcycles)."""
    generator = torch.Generator().manual_seed(seed)
    return {index: torch.randn(num_experts, hidden_size, generator=generator) * router_std
            for index in sorted(set(moe_layers))}
