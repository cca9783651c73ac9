"""Model FLOPs of a training step, counting the parameters a token actually uses (its top-k experts).

Per token and layer, the forward pass costs 2 FLOPs per weight it multiplies by: q/k/v and output
projections (grouped-query: k and v are num_query_groups heads wide), the dense SwiGLU MLP (3 matrices) or
the router plus k experts; attention adds 2 x 2 x seq x (heads x head_dim) for scores and values (no
causal discount, as Megatron-LM and PaLM count); the output layer 2 x hidden x vocabulary. Training is
forward + backward = 3 x forward. Recomputation is not counted (model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import RunConfig, padded_vocab_size

# dense peak TFLOP/s per device (NVIDIA's figures for the SXM parts)
KNOWN_PEAKS = {"H100": {"bf16": 989.0, "fp8": 1979.0}, "H200": {"bf16": 989.0, "fp8": 1979.0}}


def flops_per_token(cfg: RunConfig, num_experts: int) -> float:
    m, moe = cfg.model, cfg.moe
    h, seq = m.hidden_size, cfg.data.seq_length
    head_dim = h // m.num_attention_heads
    attn_width = m.num_attention_heads * head_dim
    kv_width = m.num_query_groups * head_dim
    qkv_and_proj = h * (attn_width + 2 * kv_width) + attn_width * h
    scores_and_values = 2 * seq * attn_width  # multiply-adds per token
    dense_mlp = 3 * h * m.ffn_hidden_size
    moe_mlp = h * num_experts + moe.topk * 3 * h * (moe.expert_ffn_hidden_size or m.ffn_hidden_size)
    if moe.shared_expert_ffn_hidden_size:  # every token also passes the shared expert and its gate
        moe_mlp += 3 * h * moe.shared_expert_ffn_hidden_size + h
    layers_dense = m.num_layers - moe.moe_last_n
    per_token_macs = (m.num_layers * (qkv_and_proj + scores_and_values) + layers_dense * dense_mlp
                      + moe.moe_last_n * moe_mlp + h * padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by))
    return 3 * 2 * per_token_macs


def peak_tflops(cfg: RunConfig, precision: str = "bf16") -> Optional[float]:
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peaks[precision] for key, peaks in KNOWN_PEAKS.items() if key in name), None)
