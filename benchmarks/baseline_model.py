"""The baseline of the GPU throughput benchmark: a Post-MoE model the way the released ApolloMoE stack runs it.

The released stack builds on Hugging Face modelling code: a Qwen2 decoder whose last `moe_last_n` layers
are Mixture-of-Experts blocks computed like transformers' Qwen2MoeSparseMoeBlock, with a Python loop over
the experts (gather the tokens routed to an expert, run its MLP, scatter-add the weighted result back).
This module reproduces that approach in plain PyTorch, so the benchmark can time it next to the
megatron-core trainer on the same GPU without depending on either code base.

Attention uses `torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)`, which picks the
flash / memory-efficient kernels on a GPU, so the comparison is about the MoE implementation and the
trainer around it, not about an unfused attention.

Parameter names match transformers' Qwen2ForCausalLM (and, for the MoE layers, transformers 4.x
Qwen2MoE: `mlp.gate` is the router, `mlp.experts.{e}.gate_proj` ...), so a dense baseline
(`moe_last_n=0`) loads a Qwen2ForCausalLM state dict as it is.

Routing (hybrid-k): probabilities are a float32 softmax over ALL experts; each token takes its top-k
experts; in training with `hybrid=True` and family ids given, a token whose language-family expert is
not among its top-k gets it in place of the weaker pick. The weights are the original probabilities of
the selected experts (not renormalised). No shared expert, no auxiliary loss.
"""
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BaselineConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    moe_last_n: int = 2
    num_experts: int = 7
    top_k: int = 2
    hybrid: bool = True
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.num_hidden_layers - self.moe_last_n


class RMSNorm(nn.Module):
    """Qwen2RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos and sin for positions 0..s-1 (rotate_half convention: the two halves share a frequency)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, device=x.device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq.to(x.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]; cos, sin [seq, head_dim]."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Qwen2 self-attention: biased q/k/v, unbiased o_proj, grouped-query heads, causal SDPA."""

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases. The dense MLP and each expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """Router plus experts, computed with a Python loop over the experts (Qwen2MoeSparseMoeBlock style)."""

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.hybrid = config.hybrid
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config.hidden_size, config.intermediate_size)
                                     for _ in range(config.num_experts))

    def route(self, x: torch.Tensor,
              family_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> (selected experts [tokens, k], weights [tokens, k] in x's dtype).

        Selected experts are sorted by probability, highest first; in training with hybrid routing and
        family ids [tokens], a missing family expert replaces the last (weaker) pick.
        """
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        selected = torch.topk(probs, self.top_k, dim=-1, sorted=True).indices
        if self.training and self.hybrid and family_ids is not None:
            family = family_ids.reshape(-1).to(device=selected.device, dtype=selected.dtype)
            held = (selected == family[:, None]).any(dim=-1)
            selected[:, -1] = torch.where(held, selected[:, -1], family)
        weights = probs.gather(1, selected).to(x.dtype)
        return selected, weights

    def forward(self, hidden_states: torch.Tensor, family_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        selected, weights = self.route(x, family_ids)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            idx, slot = torch.where(selected == e)
            if idx.numel() == 0:
                continue
            out.index_add_(0, idx, self.experts[e](x[idx]) * weights[idx, slot, None])
        return out.reshape(batch, seq, hidden)


class DecoderLayer(nn.Module):
    def __init__(self, config: BaselineConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(index)
        self.mlp = SparseMoeBlock(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                family_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, family_ids) if self.is_moe else self.mlp(h))


class BaselineModel(nn.Module):
    """The decoder stack (transformers' Qwen2Model): embeddings, layers, final norm."""

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, input_ids: torch.Tensor, family_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x, input_ids.shape[1])
        for layer in self.layers:
            x = layer(x, cos, sin, family_ids)
        return self.norm(x)


class BaselineForCausalLM(nn.Module):
    """Qwen2ForCausalLM with MoE in the last `moe_last_n` layers.

    forward(input_ids [batch, seq], family_ids [batch, seq] or None, labels [batch, seq] or None)
    returns logits [batch, seq, vocab], or (loss, logits) when labels are given: the float32 mean
    cross entropy of logits[:, :-1] against labels[:, 1:].
    """

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        self.model = BaselineModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._register_load_state_dict_pre_hook(self._fill_tied_lm_head)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _fill_tied_lm_head(self, state_dict, prefix, *args) -> None:
        """A tied checkpoint may store only the embedding: let it stand for lm_head too."""
        embed, head = prefix + "model.embed_tokens.weight", prefix + "lm_head.weight"
        if self.config.tie_word_embeddings and head not in state_dict and embed in state_dict:
            state_dict[head] = state_dict[embed]

    def forward(self, input_ids: torch.Tensor, family_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        logits = self.lm_head(self.model(input_ids, family_ids))
        if labels is None:
            return logits
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1))
        return loss, logits


__all__ = ["BaselineConfig", "BaselineForCausalLM", "BaselineModel", "DecoderLayer", "SparseMoeBlock", "MLP",
           "Attention", "RotaryEmbedding", "RMSNorm"]
