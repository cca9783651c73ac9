"""Experts in slots: megatron-core's SequentialMLP, with padding slots and expert-keyed checkpoints.

See placement.py. The computation is megatron-core's; only two things differ: padding slots are zero
and frozen (they never receive a token), and the sharded state dict names each expert by its expert
index rather than its slot, leaving padding out.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group


class SlottedSequentialMLP(SequentialMLP):
    def __init__(self, num_local_experts, config, submodules, pg_collection=None,
                 expert_of_slot: Sequence[int] = ()):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        num_slots = self.ep_group.size() * num_local_experts
        if len(expert_of_slot) != num_slots:
            raise ValueError(f"expert_of_slot has {len(expert_of_slot)} entries for {num_slots} slots")
        self.expert_of_slot = tuple(expert_of_slot)
        self.num_experts = sum(1 for e in self.expert_of_slot if e >= 0)
        self.first_slot = self.ep_group.rank() * num_local_experts
        with torch.no_grad():
            for local_idx, expert in enumerate(self.local_experts):
                if self.expert_of_slot[self.first_slot + local_idx] < 0:
                    for param in expert.parameters():
                        param.zero_()
                        param.requires_grad_(False)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """megatron-core's SequentialMLP.sharded_state_dict with slots mapped to expert indices."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton_local_shards = (metadata or {}).get("singleton_local_shards", False)
        sharded_state_dict = {}
        for local_idx, expert in enumerate(self.local_experts):
            expert_idx = self.expert_of_slot[self.first_slot + local_idx]
            if expert_idx < 0:
                continue
            state_prefix = f"{prefix}local_experts.{local_idx}."
            if singleton_local_shards:
                sharded_prefix, offsets = f"{prefix}experts.{expert_idx}.", sharded_offsets
            else:
                sharded_prefix = f"{prefix}experts."
                offsets = (*sharded_offsets, (len(sharded_offsets), expert_idx, self.num_experts))
            expert_state_dict = expert.sharded_state_dict(state_prefix, offsets, metadata)
            replace_prefix_for_sharding(expert_state_dict, state_prefix, sharded_prefix)
            for sh_ten in expert_state_dict.values():  # replicated along DP modulo EP
                sh_ten.replica_id = (*sh_ten.replica_id[:2], self.dp_group.rank())
            sharded_state_dict.update(expert_state_dict)
        return sharded_state_dict
