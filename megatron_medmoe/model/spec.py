"""Post-MoE layer specs: megatron-core's GPT decoder spec with our router, MoE layer and norms.

megatron-core's `moe_layer_freq` pattern ([0] * (L - n) + [1] * n, see transformer_config.py) decides
which layers are MoE and slices the layers per pipeline stage; here only the pieces change:
- MoE layers: FamilyMoELayer with a FamilyRouter of the configured routing mode, experts in slots
  (placement.py);
- local spec: RMSNorm that works under sequence parallelism (TransformerEngine brings its own);
- TE spec: MoE layers save their pre-MLP norm under the key the local spec uses, so checkpoints (trained,
  converted) load into either.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron.core.transformer.moe.experts import SequentialMLP

from .experts import SlottedSequentialMLP
from .moe_layer import FamilyMoELayer
from .norm import RMSNorm
from .placement import ExpertSlots
from .router import FamilyRouter


def is_moe_layer_spec(layer_spec: ModuleSpec) -> bool:
    mlp = layer_spec.submodules.mlp
    return isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type) and issubclass(mlp.module, MoELayer)


def _family_moe(mlp: ModuleSpec, routing: str, slots: ExpertSlots) -> ModuleSpec:
    experts = mlp.submodules.experts
    if experts.module is SequentialMLP:
        experts = dataclasses.replace(experts, module=SlottedSequentialMLP,
                                      params={**experts.params, "expert_of_slot": slots.expert_of_slot})
    elif slots.padded or slots.slot_of_expert != tuple(range(slots.num_experts)):
        raise ValueError(f"{experts.module.__name__} experts do not support padding slots or a placement")
    router = functools.partial(FamilyRouter, routing=routing, slot_of_expert=slots.slot_of_expert)
    submodules = dataclasses.replace(mlp.submodules, router=router, experts=experts)
    return dataclasses.replace(mlp, module=FamilyMoELayer, submodules=submodules)


def _local_norms(layer_spec: ModuleSpec) -> ModuleSpec:
    sub = layer_spec.submodules
    changes = {name: RMSNorm for name in ("input_layernorm", "pre_mlp_layernorm")
               if getattr(sub, name) is not IdentityOp}
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(sub, **changes))


# megatron-core's TE spec gives MoE layers a separate pre-MLP norm (TENorm, key pre_mlp_layernorm.weight) where its
# local spec, dense TE layers and our name table use linear_fc1's fused norm key: one on-disk name for both specs
TE_MOE_NORM_KEYS = {"pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def with_fused_norm_key(layer_spec: ModuleSpec) -> ModuleSpec:
    """A TE MoE layer spec whose pre-MLP norm weight is saved and loaded under the fused norm's key (the weight
    only: the norm's _extra_state keeps its own key, and is skipped where a checkpoint has none)."""
    sub = layer_spec.submodules
    keys = {**TE_MOE_NORM_KEYS, **sub.sharded_state_dict_keys_map}
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(sub, sharded_state_dict_keys_map=keys))


def post_moe_block_spec(config, use_transformer_engine: bool, routing: str, slots: Optional[ExpertSlots],
                        vp_stage: Optional[int] = None, pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """The decoder layers a pipeline stage (and virtual stage) builds; pp_rank None: this rank's stage."""
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_transformer_engine,
                                       normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank)
    layers = []
    for spec in block.layer_specs:
        if is_moe_layer_spec(spec):
            spec = dataclasses.replace(
                spec, submodules=dataclasses.replace(spec.submodules, mlp=_family_moe(spec.submodules.mlp, routing, slots)))
            if use_transformer_engine:
                spec = with_fused_norm_key(spec)
        if not use_transformer_engine:
            spec = _local_norms(spec)
        layers.append(spec)
    layer_norm = block.layer_norm if use_transformer_engine else RMSNorm
    return dataclasses.replace(block, layer_specs=layers, layer_norm=layer_norm)
