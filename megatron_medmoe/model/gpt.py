"""The Post-MoE language model: megatron-core's GPTModel, Qwen2-shaped, whose forward takes family ids."""
from __future__ import annotations

from typing import List, Optional

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel

from ..config import RunConfig, padded_vocab_size
from .backend import use_transformer_engine
from .placement import expert_slots
from .spec import post_moe_block_spec
from .transformer_config import build_transformer_config


def mask_padded_vocab(logits: torch.Tensor, tokenizer_vocab_size: int, first_column: int) -> torch.Tensor:
    """`logits` [..., columns] (columns first_column.. of the padded vocabulary) with every column at or past
    `tokenizer_vocab_size` set to the dtype's lowest value: no probability, no gradient."""
    start = tokenizer_vocab_size - first_column
    if start >= logits.shape[-1]:
        return logits
    padded = torch.arange(logits.shape[-1], device=logits.device) >= start
    fill = torch.finfo(logits.dtype).min  # finite: 0 * fill stays 0 where -inf would give NaN
    if logits.requires_grad:
        # out of place: an output layer's result can be a view autograd forbids writing into
        return logits.masked_fill(padded, fill)
    return logits.masked_fill_(padded, fill)


class PostMoEGPTModel(GPTModel):
    """GPTModel whose forward also takes `family_ids` [batch, seq], the routing id of every token.

    The ids ride megatron-core's explicit per-token channel to the MoE layers (its `padding_mask`
    argument, see moe_layer.py). megatron-core splits that channel for sequence parallelism only on
    the first pipeline stage (where it also embeds the tokens); later stages split it here, the same way.

    `vocab_size` is the padded vocabulary (layout-independent shapes); `tokenizer_vocab_size` the real
    one. The padded columns are masked in the loss and in the logits returned, so the model is a
    distribution over the tokenizer's vocabulary only (as the exported model is, which drops those rows).
    """

    def __init__(self, *args, tokenizer_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < tokenizer_vocab_size <= self.vocab_size:
            raise ValueError(f"tokenizer vocabulary {tokenizer_vocab_size} does not fit the padded {self.vocab_size}")
        self.tokenizer_vocab_size = tokenizer_vocab_size

    def forward(self, input_ids, position_ids, attention_mask, labels=None,
                family_ids: Optional[torch.Tensor] = None, **kwargs):
        if "padding_mask" in kwargs:
            raise TypeError("PostMoEGPTModel carries family ids on the padding_mask channel: pass family_ids")
        if family_ids is not None and not self.pre_process and self.config.sequence_parallel:
            family_ids = tensor_parallel.scatter_to_sequence_parallel_region(
                family_ids.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()
        out = super().forward(input_ids, position_ids, attention_mask, labels=labels,
                              padding_mask=family_ids, **kwargs)
        if self.post_process and labels is None:  # logits; with labels the loss, masked below
            out = self._mask_padded_vocab(out)
        return out

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return super().compute_language_model_loss(labels, self._mask_padded_vocab(logits))

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits are gathered (the whole padded vocabulary) or this tensor-parallel rank's slice of it."""
        width = logits.shape[-1]
        first = 0 if width == self.vocab_size else self.pg_collection.tp.rank() * width
        return mask_padded_vocab(logits, self.tokenizer_vocab_size, first)


def build_model_chunks(cfg: RunConfig, num_experts: int) -> List[PostMoEGPTModel]:
    """The model chunks of this rank: one per virtual pipeline stage (one when not interleaving).

    cfg must be resolved and parallel_state initialised for cfg.parallel.
    """
    use_te = use_transformer_engine(cfg.model.transformer_impl)
    config = build_transformer_config(cfg, use_cpu_initialization=not torch.cuda.is_available(),
                                      use_transformer_engine=use_te)
    slots = (expert_slots(num_experts, cfg.moe.expert_slots, cfg.moe.expert_placement)
             if cfg.moe.moe_last_n > 0 else None)
    vocab = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by)
    chunks = []
    for vp_stage in range(cfg.parallel.virtual_pipeline or 1):
        vp = vp_stage if cfg.parallel.virtual_pipeline else None
        model = PostMoEGPTModel(
            config=config,
            transformer_layer_spec=post_moe_block_spec(config, use_te, cfg.moe.routing, slots, vp_stage=vp),
            vocab_size=vocab,
            tokenizer_vocab_size=cfg.model.vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            vp_stage=vp,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
