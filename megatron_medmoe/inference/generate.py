"""Greedy generation and continuation scoring with a loaded model.

Generation keeps a key/value cache (megatron-core's StaticInferenceContext): the prompt is encoded once,
then each new token costs one position, not the whole sequence again. One prompt at a time, so no prompt
is ever padded.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .loaded import LoadedModel


@torch.no_grad()
def greedy_generate(loaded: LoadedModel, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
                    family_id: Optional[int] = None, min_new_tokens: int = 0) -> List[int]:
    """The greedily generated token ids after `prompt` (a stop token ends it and is not returned). The first
    `min_new_tokens` tokens are never stop tokens, as with transformers' min_new_tokens (their logits masked)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    limit = loaded.cfg.model.max_position_embeddings
    if len(prompt) + max_new_tokens > limit:
        raise ValueError(f"prompt of {len(prompt)} tokens + {max_new_tokens} new ones exceeds the model's "
                         f"{limit} positions")
    context = StaticInferenceContext(1, len(prompt) + max_new_tokens)
    tokens = torch.tensor([list(prompt)], dtype=torch.long)
    family = None if family_id is None else torch.full_like(tokens, family_id)
    out: List[int] = []
    for _ in range(max_new_tokens):
        logits = loaded.logits(tokens, family, inference_context=context)
        context.sequence_len_offset += tokens.shape[1]
        last = logits[0, -1]
        if len(out) < min_new_tokens and stop_ids:
            last = last.clone()
            last[list(stop_ids)] = float("-inf")
        token = int(last.argmax())
        if token in stop_ids:
            break
        out.append(token)
        tokens = torch.tensor([[token]], dtype=torch.long)
        family = None if family_id is None else torch.full_like(tokens, family_id)
    return out


@torch.no_grad()
def continuation_logprobs(loaded: LoadedModel, prompt: Sequence[int], continuations: Sequence[Sequence[int]],
                          family_id: Optional[int] = None, pad_id: int = 0) -> List[float]:
    """Sum of log p(continuation tokens | prompt) for each continuation: one forward pass for all of them
    (rows right-padded; causal attention keeps padding out of every scored position)."""
    width = len(prompt) + max(len(c) for c in continuations)
    rows = torch.full((len(continuations), width), pad_id, dtype=torch.long)
    for i, cont in enumerate(continuations):
        rows[i, :len(prompt) + len(cont)] = torch.tensor([*prompt, *cont])
    family = None if family_id is None else torch.full_like(rows, family_id)
    logprobs = torch.log_softmax(loaded.logits(rows, family).double(), dim=-1)
    scores = []
    for i, cont in enumerate(continuations):
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(cont))
        scores.append(float(logprobs[i, positions, torch.tensor(cont)].sum()))
    return scores
