"""The name table between Hugging Face Qwen2 / Qwen2-MoE / ApolloMoE tensors and megatron-core's.

One row per megatron-core tensor: its key, the Hugging Face names it is made of, and the transform
between them. `{i}` is a layer, `{e}` an expert. The transforms are the places conversions go wrong:

- qkv: megatron-core fuses q, k and v per key/value group: for each group g, the group's query heads,
  then its key head, then its value head. Applies to the weight AND the Qwen2 q/k/v bias.
- gate_up: the SwiGLU fc1 is [gate; up] stacked on the output dimension.
- experts / experts_gate_up: one tensor per layer with the experts on a leading axis, in expert order.
- vocab: rows beyond the tokenizer's vocabulary pad the embedding and output layer to a multiple of
  model.make_vocab_size_divisible_by; they are zero on import and dropped on export (the model masks their
  logits, so they never hold probability).
The router is a plain copy: both sides take the softmax over all experts, then the top k, with no
renormalisation (Qwen2-MoE's norm_topk_prob false).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .errors import ConvertError


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: Tuple[str, ...]
    kind: str  # copy | vocab | qkv | gate_up | experts | experts_gate_up
    layers: str  # global | all | dense | moe | shared (MoE layers of a model with a shared expert)
    only_untied: bool = False


ATTN = "model.layers.{i}.self_attn."
RULES: Tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", "global"),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight", ("model.layers.{i}.input_layernorm.weight",),
         "copy", "all"),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.weight",
         (ATTN + "q_proj.weight", ATTN + "k_proj.weight", ATTN + "v_proj.weight"), "qkv", "all"),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.bias",
         (ATTN + "q_proj.bias", ATTN + "k_proj.bias", ATTN + "v_proj.bias"), "qkv", "all"),
    Rule("decoder.layers.{i}.self_attention.linear_proj.weight", (ATTN + "o_proj.weight",), "copy", "all"),
    Rule("decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         "copy", "all"),
    Rule("decoder.layers.{i}.mlp.linear_fc1.weight",
         ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"), "gate_up", "dense"),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), "copy", "dense"),
    Rule("decoder.layers.{i}.mlp.router.weight", ("model.layers.{i}.mlp.gate.weight",), "copy", "moe"),
    Rule("decoder.layers.{i}.mlp.experts.experts.linear_fc1.weight",
         ("model.layers.{i}.mlp.experts.{e}.gate_proj.weight", "model.layers.{i}.mlp.experts.{e}.up_proj.weight"),
         "experts_gate_up", "moe"),
    Rule("decoder.layers.{i}.mlp.experts.experts.linear_fc2.weight", ("model.layers.{i}.mlp.experts.{e}.down_proj.weight",),
         "experts", "moe"),
    Rule("decoder.layers.{i}.mlp.shared_experts.linear_fc1.weight",
         ("model.layers.{i}.mlp.shared_expert.gate_proj.weight", "model.layers.{i}.mlp.shared_expert.up_proj.weight"),
         "gate_up", "shared"),
    Rule("decoder.layers.{i}.mlp.shared_experts.linear_fc2.weight", ("model.layers.{i}.mlp.shared_expert.down_proj.weight",),
         "copy", "shared"),
    Rule("decoder.layers.{i}.mlp.shared_experts.gate_weight", ("model.layers.{i}.mlp.shared_expert_gate.weight",),
         "copy", "shared"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", "global"),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", "global", only_untied=True),
)


@dataclass(frozen=True)
class Arch:
    """What the table needs to know about a model."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_groups: int
    vocab_size: int  # the tokenizer's: what Hugging Face files hold
    padded_vocab_size: int  # ours
    moe_layers: Tuple[int, ...]  # 0-based
    num_experts: int
    tied: bool
    shared_ffn: int = 0  # the shared expert's size; 0: none

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class Entry:
    """One megatron-core tensor and the Hugging Face tensors it is made of (experts: expert-major order)."""
    mcore: str
    hf: Tuple[str, ...]
    kind: str


def entries(arch: Arch) -> List[Entry]:
    out = []
    for rule in RULES:
        if rule.only_untied and arch.tied:
            continue
        if rule.layers == "global":
            out.append(Entry(rule.mcore, rule.hf, rule.kind))
            continue
        for i in range(arch.num_layers):
            moe = i in arch.moe_layers
            if (rule.layers == "dense" and moe) or (rule.layers == "moe" and not moe):
                continue
            if rule.layers == "shared" and not (moe and arch.shared_ffn):
                continue
            names = tuple(n.replace("{i}", str(i)) for n in rule.hf)
            if "{e}" in rule.hf[0]:
                names = tuple(n.replace("{e}", str(e)) for e in range(arch.num_experts) for n in names)
            out.append(Entry(rule.mcore.replace("{i}", str(i)), names, rule.kind))
    return out


def to_mcore(entry: Entry, parts: Sequence[torch.Tensor], arch: Arch) -> torch.Tensor:
    kind = entry.kind
    if kind == "copy":
        return parts[0]
    if kind == "vocab":
        (t,) = parts
        if t.shape[0] != arch.vocab_size:
            raise ConvertError(f"{entry.hf[0]} has {t.shape[0]} rows for a vocabulary of {arch.vocab_size}")
        pad = t.new_zeros(arch.padded_vocab_size - t.shape[0], *t.shape[1:])
        return torch.cat([t, pad]) if pad.shape[0] else t
    if kind == "qkv":
        q, k, v = parts
        g, d = arch.num_groups, arch.head_dim
        tail = q.shape[1:]
        per_group = [x.reshape(g, -1, *tail) for x in (q, k, v)]
        if per_group[1].shape[1] != d:
            raise ConvertError(f"{entry.hf[1]}: {tuple(k.shape)} is not {g} key/value heads of size {d}")
        return torch.cat(per_group, dim=1).reshape(-1, *tail)
    if kind == "gate_up":
        return torch.cat(parts)
    if kind == "experts":
        return torch.stack(list(parts))
    if kind == "experts_gate_up":
        return torch.stack([torch.cat(parts[2 * e:2 * e + 2]) for e in range(arch.num_experts)])
    raise ValueError(kind)


def to_hf(entry: Entry, tensor: torch.Tensor, arch: Arch) -> List[torch.Tensor]:
    """The Hugging Face tensors of one megatron-core tensor, in the order of entry.hf."""
    kind = entry.kind
    if kind == "copy":
        return [tensor]
    if kind == "vocab":
        return [tensor[:arch.vocab_size]]
    if kind == "qkv":
        g, d = arch.num_groups, arch.head_dim
        q_per_group = arch.num_heads // g
        grouped = tensor.reshape(g, (q_per_group + 2) * d, *tensor.shape[1:])
        q, k, v = torch.split(grouped, [q_per_group * d, d, d], dim=1)
        return [x.reshape(-1, *tensor.shape[1:]) for x in (q, k, v)]
    if kind == "gate_up":
        return list(torch.chunk(tensor, 2))
    if kind == "experts":
        return list(tensor.unbind(0))
    if kind == "experts_gate_up":
        return [half for expert in tensor.unbind(0) for half in torch.chunk(expert, 2)]
    raise ValueError(kind)


def hf_shapes(arch: Arch, ffn: int, expert_ffn: int) -> Dict[str, Tuple[int, ...]]:
    """The shape every Hugging Face tensor of the table must have."""
    h, d, g, n = arch.hidden_size, arch.head_dim, arch.num_groups, arch.num_heads
    by_suffix = {"q_proj.weight": (n * d, h), "k_proj.weight": (g * d, h), "v_proj.weight": (g * d, h),
                 "q_proj.bias": (n * d,), "k_proj.bias": (g * d,), "v_proj.bias": (g * d,),
                 "o_proj.weight": (h, n * d), "layernorm.weight": (h,), "norm.weight": (h,),
                 "gate.weight": (arch.num_experts, h)}
    out = {}
    for entry in entries(arch):
        for name in entry.hf:
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                out[name] = (arch.vocab_size, h)
            elif ".shared_expert." in name:
                out[name] = (h, arch.shared_ffn) if name.endswith("down_proj.weight") else (arch.shared_ffn, h)
            elif name.endswith("shared_expert_gate.weight"):
                out[name] = (1, h)
            elif ".experts." in name:
                out[name] = (h, expert_ffn) if name.endswith("down_proj.weight") else (expert_ffn, h)
            elif name.endswith(("gate_proj.weight", "up_proj.weight")):
                out[name] = (ffn, h)
            elif name.endswith("down_proj.weight"):
                out[name] = (h, ffn)
            else:
                out[name] = next(shape for suffix, shape in by_suffix.items() if name.endswith(suffix))
    return out
