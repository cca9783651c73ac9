"""Expert slots: where each expert sits among the expert-parallel ranks.

megatron-core needs the expert-parallel size to divide the number of experts, but 7 language families
do not split over 2, 4 or 8 ranks. The experts are therefore placed in `moe.expert_slots` slots (8 for
7 families on 2, 4 or 8 ranks); expert-parallel rank r owns slots [r * L, (r + 1) * L). Unused slots
are padding: frozen, zero, never routed to, and absent from checkpoints, which are keyed by expert index,
so a checkpoint does not depend on the layout, the number of slots or the placement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


@dataclass(frozen=True)
class ExpertSlots:
    num_experts: int
    num_slots: int
    slot_of_expert: Tuple[int, ...]  # expert index -> slot
    expert_of_slot: Tuple[int, ...]  # slot -> expert index, -1 for padding

    @property
    def padded(self) -> bool:
        return self.num_slots != self.num_experts


def expert_slots(num_experts: int, num_slots: int, placement: Optional[Sequence[int]] = None) -> ExpertSlots:
    """placement: the slot of each expert (None: expert i in slot i)."""
    slot_of_expert = tuple(range(num_experts)) if placement is None else tuple(int(s) for s in placement)
    problem = placement_problem(slot_of_expert, num_experts, num_slots)
    if problem:
        raise ValueError(problem)
    expert_of_slot = [-1] * num_slots
    for expert, slot in enumerate(slot_of_expert):
        expert_of_slot[slot] = expert
    return ExpertSlots(num_experts, num_slots, slot_of_expert, tuple(expert_of_slot))


def placement_problem(slot_of_expert: Sequence[int], num_experts: int, num_slots: int) -> str:
    """Why a placement cannot be used ('' when it can)."""
    if len(slot_of_expert) != num_experts:
        return f"the placement lists {len(slot_of_expert)} slots but there are {num_experts} experts"
    if any(not 0 <= s < num_slots for s in slot_of_expert):
        return f"every slot must be in [0, {num_slots}) for this expert-parallel size, got {list(slot_of_expert)}"
    if len(set(slot_of_expert)) != num_experts:
        return f"two experts share a slot in {list(slot_of_expert)}"
    return ""
