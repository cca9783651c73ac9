"""Our resolved RunConfig -> megatron-core's TransformerConfig for a Qwen2-style Post-MoE decoder."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from megatron.core.transformer import TransformerConfig

from ..config import RunConfig
from .backend import fusion_settings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def moe_layer_pattern(num_layers: int, moe_last_n: int) -> List[int]:
    """megatron-core's per-layer MoE pattern: dense first, MoE in the last `moe_last_n` layers."""
    return [0] * (num_layers - moe_last_n) + [1] * moe_last_n


def build_transformer_config(cfg: RunConfig, use_cpu_initialization: bool,
                             use_transformer_engine: bool = False) -> TransformerConfig:
    m, moe, par, tr = cfg.model, cfg.moe, cfg.parallel, cfg.training
    dtype = DTYPES[tr.precision]
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.hidden_size // m.num_attention_heads,
        # Qwen2: RMSNorm, SwiGLU, bias on q/k/v only
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        # layout
        tensor_model_parallel_size=par.tensor,
        pipeline_model_parallel_size=par.pipeline,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline,
        expert_model_parallel_size=par.expert,
        expert_tensor_parallel_size=par.expert_tensor,
        sequence_parallel=par.sequence_parallel,
        # Interleaved 1F1B on 2 stages sends activations and gradients to the SAME peer in one step; the
        # batched p2p path posts them in an order the peer receives the other way round (same shapes,
        # silently swapped). The unbatched path sends each direction on its own communicator.
        batch_p2p_comm=not (par.pipeline == 2 and par.virtual_pipeline is not None),
        # precision
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=tr.precision == "bf16",
        use_cpu_initialization=use_cpu_initialization,
        # the loss is summed over tokens and divided by the global token count, so it does not depend on
        # how tokens are split into micro-batches and data-parallel ranks
        calculate_per_token_loss=True,
        recompute_granularity=tr.recompute_granularity,
        recompute_method=tr.recompute_method if tr.recompute_granularity == "full" else None,
        recompute_num_layers=tr.recompute_num_layers if tr.recompute_granularity == "full" else None,
        recompute_modules=list(tr.recompute_modules),
    )
    if moe.moe_last_n > 0:
        kwargs.update(
            num_moe_experts=moe.expert_slots,  # megatron-core's experts are our slots (placement.py)
            moe_layer_freq=moe_layer_pattern(m.num_layers, moe.moe_last_n),
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
            moe_router_topk=moe.topk,
            # FamilyRouter does its own float32 softmax over all experts without renormalisation; these
            # two settings describe that rule to the rest of megatron-core (and to exported configs)
            moe_router_pre_softmax=True,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type=moe.token_dispatcher,
            # null: grouped where it can be (validation turned it off for padding slots or a placement)
            moe_grouped_gemm=use_transformer_engine if moe.grouped_gemm is None else moe.grouped_gemm,
            moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_z_loss_coeff=moe.z_loss_coeff if moe.z_loss_coeff > 0 else None,
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
            moe_shared_expert_gate=moe.shared_expert_ffn_hidden_size is not None,
        )
    if cfg.fp8.format is not None:
        kwargs.update(fp8_settings(cfg))
    # a machine without a GPU initialises on the CPU: there every fusion resolves to off
    kwargs.update(fusion_settings(cfg.fusions, on_gpu=not use_cpu_initialization, use_te=use_transformer_engine)[0])
    return TransformerConfig(**kwargs)


def fp8_settings(cfg: RunConfig) -> dict:
    """fp8.* -> megatron-core's names. The TransformerBlock enters TransformerEngine's FP8 context per layer
    (per block for delayed scaling) and leaves the bf16 layers out of it."""
    f8 = cfg.fp8
    settings = dict(fp8=f8.format, fp8_recipe=f8.recipe, fp8_margin=f8.margin,
                    fp8_amax_history_len=f8.amax_history_len, fp8_amax_compute_algo=f8.amax_compute_algo)
    if f8.bf16_first_layers or f8.bf16_last_layers:
        settings.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=f8.bf16_first_layers,
                        num_layers_at_end_in_bf16=f8.bf16_last_layers)
    if cfg.moe.moe_last_n > 0 and f8.pad_expert_tokens:
        settings["moe_router_padding_for_quantization"] = True
    return settings
