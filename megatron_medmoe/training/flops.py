"""Model FLOPs of a training step, counting the parameters a token actually uses (its top-k experts).

Per token and layer, the forward pass costs 2 FLOPs per weight it multiplies by: q/k/v and output
projections (grouped-query: k and v are num_query_groups heads wide), the dense SwiGLU MLP (3 matrices) or
the router plus k experts; attention adds 2 x 2 x seq x (heads x head_dim) for scores and values (no
causal discount, as Megatron-LM and PaLM count); the output layer 2 x hidden x vocabulary. Training is
forward + backward = 3 x forward. Recomputation is not counted (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..config import RunConfig, padded_vocab_size
from ..runtime.gpus import gpu_of


def macs_per_token(cfg: RunConfig, num_experts: int) -> Dict[str, int]:
    """Multiply-adds of one token's forward pass, by part (attention: scores and values, the part that multiplies
    no weight; experts: the token's top-k routed experts)."""
    m, moe = cfg.model, cfg.moe
    h, seq = m.hidden_size, cfg.data.seq_length
    head_dim = h // m.num_attention_heads
    attn_width = m.num_attention_heads * head_dim
    kv_width = m.num_query_groups * head_dim
    parts = {
        "projections": m.num_layers * (h * (attn_width + 2 * kv_width) + attn_width * h),
        "attention": m.num_layers * 2 * seq * attn_width,
        "dense_mlp": (m.num_layers - moe.moe_last_n) * 3 * h * m.ffn_hidden_size,
        "router": moe.moe_last_n * h * num_experts,
        "experts": moe.moe_last_n * moe.topk * 3 * h * (moe.expert_ffn_hidden_size or m.ffn_hidden_size),
        "output": h * padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by),
    }
    if moe.shared_expert_ffn_hidden_size:  # every token also passes the shared expert and its gate
        parts["shared_expert"] = moe.moe_last_n * (3 * h * moe.shared_expert_ffn_hidden_size + h)
    return parts


def flops_per_token(cfg: RunConfig, num_experts: int) -> float:
    return 3 * 2 * sum(macs_per_token(cfg, num_experts).values())


def peak_tflops(cfg: RunConfig) -> Optional[float]:
    """The dense peak MFU is read against: logging.peak_tflops, else the GPU's bf16 figure for bf16 training."""
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops
    if not torch.cuda.is_available() or cfg.training.precision != "bf16":
        return None
    spec = gpu_of(torch.cuda.get_device_name())
    return spec.bf16_tflops if spec else None
