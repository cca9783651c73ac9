"""Memory per GPU of a resolved config, per pipeline stage: weights, gradients, optimizer state, activations.

What megatron-core keeps, as our trainer configures it on GPUs (training/loop.py, optimizer.py):
- weights in the training precision (bf16: 2 bytes; fp32: 4); FP8 layers add TransformerEngine's FP8 copy
  and its transpose of every GEMM weight (2 bytes);
- gradients in an fp32 buffer (grad_reduce_in_fp32), 4 bytes, for every trainable parameter;
- the distributed optimizer: fp32 main weights (bf16 runs only) and Adam's two moments, 12 (or 8) bytes per
  trainable parameter, sharded over the data-parallel group (expert weights over the expert-data-parallel
  group). Padding slots are frozen: weights only.
- activations saved for backward, per layer and micro-batch (elements of 2 bytes; s seq, b micro-batch,
  h hidden, f ffn, a heads, g kv heads, d head dim, t tensor-parallel, S = t with sequence parallelism else 1):
    attention   2sbh/S (norm input, q/k/v input) + sb(ad + 2gd)/t (q, k, v) + sbad/t (output) + 2sba/t
                (float32 softmax statistics); without flash attention (local layers) also the s x s
                softmax, sba s/t, unless selective recomputation recomputes core attention;
    dense MLP   2sbh/S (norm input, fc1 input) + 3sbf/t (gate and up, SwiGLU output);
    MoE MLP     2sbh/S + 4sbE/S (router logits and probabilities, float32) + R (2h + 3f_e/t_e) for the R
                token copies the busiest expert rank computes (input and output of each copy, its gate, up,
                SwiGLU); R = k sb/S x EP x ETP x (that rank's share of the routed tokens);
    full recomputation keeps only each layer's input, sbh/S, plus one layer's activations at a time.
  The last stage also holds the logits, 6 bytes (bf16 output, float32 copy in the cross entropy) per token
  and vocabulary entry of its tensor-parallel slice.
- micro-batches in flight: 1F1B holds min(p - i, M) on stage i (interleaved: its warm-up chunks + 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional

from ..config import RunConfig, padded_vocab_size
from ..model.backend import planned_layers

GiB = 1024 ** 3


@dataclass(frozen=True)
class StageParams:
    """Parameters one GPU of a pipeline stage holds."""
    dense: int  # trainable, replicated over data-parallel ranks (attention, dense MLPs, norms, routers, embeddings)
    experts: int  # trainable expert weights (sharded over expert-parallel and expert-tensor-parallel ranks)
    frozen: int  # padding-slot experts
    gemm: int  # weights that run through FP8 GEMMs when fp8.format is set (attention, MLPs, experts)


@dataclass(frozen=True)
class StageMemory:
    stage: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    in_flight: int  # micro-batches (interleaved: model chunks) whose activations are held at the peak

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def layers_of_rank(cfg: RunConfig, stage: int) -> List[int]:
    """Decoder layer indices on pipeline rank `stage` (all its virtual chunks)."""
    p, v = cfg.parallel.pipeline, cfg.parallel.virtual_pipeline or 1
    per_chunk = cfg.model.num_layers // (p * v)
    return [layer for c in range(v) for layer in range((c * p + stage) * per_chunk, (c * p + stage + 1) * per_chunk)]


def is_moe_layer(cfg: RunConfig, layer: int) -> bool:
    return layer >= cfg.model.num_layers - cfg.moe.moe_last_n


def stage_params(cfg: RunConfig, stage: int, num_experts: int) -> StageParams:
    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    t, p, e, et = par.tensor, par.pipeline, par.expert, par.expert_tensor
    h, d = m.hidden_size, m.hidden_size // m.num_attention_heads
    qkv_width = (m.num_attention_heads + 2 * m.num_query_groups) * d
    attn_gemm = (h * qkv_width + m.num_attention_heads * d * h) // t
    attn = attn_gemm + qkv_width // t + h  # q/k/v bias, input norm
    dense_mlp_gemm = 3 * h * m.ffn_hidden_size // t
    expert_gemm = 3 * h * (moe.expert_ffn_hidden_size or m.ffn_hidden_size) // et
    local_slots = (moe.expert_slots or num_experts) // e
    busiest_real = min(local_slots, num_experts)  # the rank with the most real experts
    dense = experts = frozen = gemm = 0
    for layer in layers_of_rank(cfg, stage):
        dense += attn + h  # + pre-MLP norm
        gemm += attn_gemm
        if is_moe_layer(cfg, layer):
            dense += h * num_experts  # router, replicated over tensor-parallel ranks
            experts += busiest_real * expert_gemm
            frozen += (local_slots - busiest_real) * expert_gemm
            gemm += local_slots * expert_gemm
            if moe.shared_expert_ffn_hidden_size:
                dense += 3 * h * moe.shared_expert_ffn_hidden_size // t + h
        else:
            dense += dense_mlp_gemm
            gemm += dense_mlp_gemm
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by) * h // t
    if stage == 0:
        dense += vocab
    if stage == p - 1:
        dense += h  # final norm
        if not m.tie_embeddings or p > 1:  # untied output layer, or the tied copy on the last stage
            dense += vocab
    return StageParams(dense, experts, frozen, gemm)


def activation_elements(cfg: RunConfig, moe_layer: bool, recompute: Optional[str], expert_rank_share: float) -> float:
    """Elements (2 bytes each) one layer saves for backward for one micro-batch, without recomputation's
    savings (see stage_memory for those). expert_rank_share: the busiest expert-parallel rank's share of the
    routed tokens (1 / EP when balanced)."""
    m, moe, par, data = cfg.model, cfg.moe, cfg.parallel, cfg.data
    s, b, h, a, g = data.seq_length, cfg.training.micro_batch_size, m.hidden_size, m.num_attention_heads, m.num_query_groups
    d, t = h // a, par.tensor
    sp = t if par.sequence_parallel else 1
    sb = s * b
    attn = 2 * sb * h / sp + sb * (a * d + 2 * g * d) / t + sb * a * d / t + 2 * sb * a / t
    flash = planned_layers(cfg.model.transformer_impl)[0] != "local"  # TE's fused attention keeps no s x s scores
    if not flash and not (recompute == "selective" and "core_attn" in cfg.training.recompute_modules):
        attn += sb * a * s / t
    if not moe_layer:
        return attn + 2 * sb * h / sp + 3 * sb * m.ffn_hidden_size / t
    fe, et = moe.expert_ffn_hidden_size or m.ffn_hidden_size, par.expert_tensor
    copies = moe.topk * sb / sp * par.expert * et * expert_rank_share
    mlp = 2 * sb * h / sp + 4 * sb * moe.expert_slots / sp + copies * (2 * h + 3 * fe / et)
    if moe.shared_expert_ffn_hidden_size:
        mlp += 3 * sb * moe.shared_expert_ffn_hidden_size / t
    return attn + mlp


def micro_batches_per_step(cfg: RunConfig) -> int:
    tr = cfg.training
    return tr.global_batch_size // (tr.micro_batch_size * cfg.parallel.data)


def in_flight(cfg: RunConfig, stage: int) -> int:
    """Micro-batches (interleaved: model chunks) whose activations stage `stage` holds at its peak."""
    p, v, n = cfg.parallel.pipeline, cfg.parallel.virtual_pipeline, micro_batches_per_step(cfg)
    if v is None:
        return min(p - stage, n)
    return min((p - stage - 1) * 2 + (v - 1) * p + 1, n * v)


def stage_memory(cfg: RunConfig, stage: int, num_experts: int, recompute: Optional[str] = None,
                 expert_rank_share: Optional[float] = None) -> StageMemory:
    """Peak bytes on one GPU of pipeline stage `stage`. recompute: None, 'selective' or 'full'."""
    par, tr = cfg.parallel, cfg.training
    share = expert_rank_share if expert_rank_share is not None else 1.0 / par.expert
    params = stage_params(cfg, stage, num_experts)
    bf16 = tr.precision == "bf16"
    weight_bytes = 2 if bf16 else 4
    weights = (params.dense + params.experts + params.frozen) * weight_bytes
    if cfg.fp8.format is not None:
        weights += 2 * params.gemm
    gradients = 4 * (params.dense + params.experts)
    expert_dp = par.tensor * par.data // (par.expert * par.expert_tensor)
    state = 12 if bf16 else 8
    optimizer = state * (params.dense / par.data + params.experts / expert_dp)

    layers = layers_of_rank(cfg, stage)
    per_layer = [activation_elements(cfg, is_moe_layer(cfg, layer), recompute, share) for layer in layers]
    chunks = in_flight(cfg, stage)
    v = par.virtual_pipeline or 1
    sp = par.tensor if par.sequence_parallel else 1
    sbh = cfg.data.seq_length * tr.micro_batch_size * cfg.model.hidden_size / sp
    if recompute == "full":
        kept = len(layers) * sbh * chunks / v
        elements = kept + max(per_layer)  # one layer recomputed at a time
    else:
        elements = sum(per_layer) * chunks / v
    activations = 2 * elements
    logits = 0.0
    if stage == par.pipeline - 1:
        vocab = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by)
        logits = 6 * cfg.data.seq_length * tr.micro_batch_size * vocab / par.tensor + 2 * 2 * sbh
    return StageMemory(stage, float(weights), float(gradients), float(optimizer), float(activations), float(logits),
                       chunks)


def peak_memory(cfg: RunConfig, num_experts: int, recompute: Optional[str] = None,
                expert_rank_share: Optional[float] = None) -> StageMemory:
    """The stage with the largest total: what decides whether a layout fits."""
    return max((stage_memory(cfg, i, num_experts, recompute, expert_rank_share) for i in range(cfg.parallel.pipeline)),
               key=lambda mem: mem.total)
