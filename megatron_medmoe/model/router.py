"""The language-family router: megatron-core's TopKRouter with the ApolloMoE routing rule.

megatron-core's own router applies top-k and then a softmax over the chosen k (or renormalises after a
pre-softmax); the spec needs a float32 softmax over ALL experts, the family expert forced into the top-k
in training, and the original probabilities as weights. The gate is a bias-free linear from the hidden
size to the experts (not to the padded slots, see placement.py); the z-loss is megatron-core's.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron.core.transformer.moe.moe_utils import (
    get_tokens_per_expert_and_token_count,
    switch_load_balancing_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter

from .routing import routing_weights, select_experts


class RoutingStats:
    """Per-expert token counts and the forcing rate, accumulated until read and reset by the metrics.

    Counted once per micro-batch: when a forward is checkpointed, its first pass runs without grad and is
    skipped; the recomputation counts (as megatron-core counts tokens for its expert bias). The counts stay
    on the router's device until the metrics read them at a log step: no host synchronisation per layer.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def add(self, routing_map: torch.Tensor, held: Optional[torch.Tensor]) -> None:
        if self._tokens is None:
            self._tokens = torch.zeros(self.num_experts, dtype=torch.float64, device=routing_map.device)
            self._held = torch.zeros((), dtype=torch.float64, device=routing_map.device)
        self._tokens += routing_map.sum(dim=0)
        if held is not None:
            self._held += held.sum()
            self.family_checked += held.numel()  # a shape: known on the host

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """Tokens routed to each expert (host, float64)."""
        return torch.zeros(self.num_experts, dtype=torch.float64) if self._tokens is None else self._tokens.cpu()

    @property
    def family_held(self) -> float:
        """Tokens whose own top-k already held their family expert (hybrid routing in training)."""
        return 0.0 if self._held is None else float(self._held)

    def reset(self) -> None:
        self._tokens: Optional[torch.Tensor] = None
        self._held: Optional[torch.Tensor] = None
        self.family_checked = 0  # tokens for which that was checked


class FamilyRouter(TopKRouter):
    def __init__(self, config, pg_collection=None, routing: str = "hybrid",
                 slot_of_expert: Sequence[int] = ()):
        super().__init__(config=config, pg_collection=pg_collection)
        self.routing_mode = routing
        self.num_experts = len(slot_of_expert)
        # one gate row per expert, whatever the number of slots
        self.weight = torch.nn.Parameter(torch.empty((self.num_experts, config.hidden_size), dtype=torch.float32))
        self.reset_parameters()
        self.register_buffer("slot_of_expert", torch.tensor(list(slot_of_expert), dtype=torch.long), persistent=False)
        self.slots_are_experts = list(slot_of_expert) == list(range(config.num_moe_experts))
        self.stats = RoutingStats(self.num_experts)

    def forward(self, input: torch.Tensor, family_ids: Optional[torch.Tensor] = None):
        """input [s, b, h]; family_ids [s, b] for the same tokens in the same order, or None.

        Returns megatron-core's (probs, routing_map), both [s * b, slots].
        """
        if family_ids is not None and tuple(family_ids.shape) != tuple(input.shape[:2]):
            raise ValueError(
                f"family ids of shape {tuple(family_ids.shape)} do not match the router's tokens "
                f"{tuple(input.shape[:2])} (layer {self.layer_number}): they must be split like the hidden states")
        logits = self.gating(input).view(-1, self.num_experts)
        logits = self.apply_z_loss(logits)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        ids = None if family_ids is None else family_ids.reshape(-1)
        selected, held = select_experts(probs, self.topk, self.routing_mode, self.training, ids)
        weights, routing_map = routing_weights(probs, selected, self.routing_mode)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            weights = self._attach_aux_loss(weights, probs, routing_map)
        if torch.is_grad_enabled() or not self.training:
            self._count(routing_map, held)
        return self._to_slots(weights), self._to_slots(routing_map)

    def _to_slots(self, per_expert: torch.Tensor) -> torch.Tensor:
        """A new tensor in slot columns: megatron-core's dispatcher may edit the routing map in place (FP8 token
        padding, pad_routing_map), and autograd keeps ours for the backward pass of the weights."""
        if self.slots_are_experts:
            return per_expert.clone()
        out = per_expert.new_zeros((per_expert.shape[0], self.config.num_moe_experts))
        return out.index_copy(1, self.slot_of_expert, per_expert)

    def _attach_aux_loss(self, weights, probs, routing_map):
        """Switch-style balance over the tokens actually dispatched, scored by the full softmax."""
        coeff = self.get_aux_loss_coeff("aux_loss")
        tokens_per_expert, local_tokens, total_tokens = get_tokens_per_expert_and_token_count(
            routing_map=routing_map, reduce_group=self.tp_cp_group, topk=self.topk)
        aux_loss = switch_load_balancing_loss_func(
            probs=probs, tokens_per_expert=tokens_per_expert, total_num_tokens=total_tokens,
            topk=self.topk, num_experts=self.num_experts, moe_aux_loss_coeff=coeff)
        return self.attach_and_log_load_balancing_loss(weights, coeff, aux_loss, "load_balancing_loss",
                                                       self.tp_cp_group, valid_token_count=local_tokens)

    @torch.no_grad()
    def _count(self, routing_map: torch.Tensor, held: Optional[torch.Tensor]):
        self.stats.add(routing_map, held)
