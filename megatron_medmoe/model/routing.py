"""Which experts a token goes to, and with what weight: the routing rule of the spec, as plain tensor math.

Kept free of megatron-core so it can be read (and tested) on its own. Shapes: probs [tokens, experts]
float32 softmax over ALL experts; family_ids [tokens] expert index of each token's language family.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

ROUTING_MODES = ("hybrid", "topk", "hard")


def select_experts(
    probs: torch.Tensor, topk: int, mode: str, training: bool, family_ids: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Return (selected expert indices [tokens, k], whether the router's own top-k already held the
    family expert [tokens] or None when that question does not apply).

    hybrid: top-k of probs; in training, a token whose family expert is missing gets it in place of
            the weaker (last) pick. In eval, plain top-k: no language id is needed or used.
    topk:   plain top-k, always.
    hard:   the family expert only (k = 1), in training and in eval.
    """
    if mode == "hard":
        if family_ids is None:
            raise ValueError("hard routing needs the family id of every token (got none)")
        return family_ids.reshape(-1, 1).long(), None
    top = torch.topk(probs, k=topk, dim=-1, sorted=True).indices
    if mode == "topk" or not training:
        return top, None
    if mode != "hybrid":
        raise ValueError(f"unknown routing mode {mode!r}; expected one of {ROUTING_MODES}")
    if family_ids is None:
        raise ValueError("hybrid routing in training needs the family id of every token (got none)")
    family = family_ids.reshape(-1).long()
    held = (top == family.unsqueeze(-1)).any(dim=-1)
    top[:, -1] = torch.where(held, top[:, -1], family)  # sorted descending: the last pick is the weaker
    return top, held


def routing_weights(probs: torch.Tensor, selected: torch.Tensor, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weights [tokens, experts], routing_map [tokens, experts] bool) in megatron-core's layout.

    Weights are the ORIGINAL softmax probabilities of the selected experts, not renormalised over
    them (Qwen2-MoE's norm_topk_prob = false); hard routing weighs its single expert by 1.
    """
    routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, selected, True)
    if mode == "hard":
        return routing_map.to(probs.dtype), routing_map
    return probs * routing_map, routing_map
