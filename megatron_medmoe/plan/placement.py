"""Where the family experts sit: slots on expert-parallel ranks that balance the expected routed tokens.

Under hybrid-k routing every token's family expert is one of its k picks; the other k - 1 picks follow the
router, which the planner cannot know, so they are spread evenly over the other experts. The expected
share of routed token copies of expert i is then (p_i + (k - 1)(1 - p_i) / (E - 1)) / k for family token
shares p (hard routing, or k = 1: p_i). The busiest expert-parallel rank sets the pace of the MoE layers
(compute and all-to-all), so the placement minimises the largest rank load: exactly (subset search) for up
to 12 experts, by longest-first greedy above.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Sequence, Tuple

EXACT_MAX_EXPERTS = 12


def expert_loads(family_shares: Sequence[float], topk: int, routing: str) -> List[float]:
    """Expected share of routed token copies per expert (sums to 1)."""
    total = sum(family_shares)
    shares = [s / total for s in family_shares]
    n = len(shares)
    if routing == "hard" or topk == 1 or n == 1:
        return shares
    return [(p + (topk - 1) * (1 - p) / (n - 1)) / topk for p in shares]


@dataclass(frozen=True)
class Placement:
    experts_of_rank: Tuple[Tuple[int, ...], ...]
    rank_loads: Tuple[float, ...]
    slots: int

    @property
    def max_load(self) -> float:
        return max(self.rank_loads)

    @property
    def imbalance(self) -> float:
        """Busiest rank's load over the mean (1 = perfectly balanced)."""
        return self.max_load * len(self.rank_loads)

    @property
    def slot_of_expert(self) -> List[int]:
        """moe.expert_placement: rank r's experts take its slots r * L, r * L + 1, ... in order."""
        per_rank = self.slots // len(self.experts_of_rank)
        slot = {}
        for rank, experts in enumerate(self.experts_of_rank):
            for j, expert in enumerate(experts):
                slot[expert] = rank * per_rank + j
        return [slot[i] for i in range(len(slot))]


def balance_experts(loads: Sequence[float], ranks: int, slots: int) -> Placement:
    """Assign experts to `ranks` ranks of slots // ranks slots each, minimising the busiest rank's load."""
    n = len(loads)
    per_rank = slots // ranks
    if slots % ranks or per_rank * ranks < n:
        raise ValueError(f"{n} experts do not fit {ranks} ranks of {slots} slots")
    groups = _exact(loads, ranks, per_rank) if n <= EXACT_MAX_EXPERTS else _greedy(loads, ranks, per_rank)
    groups = sorted((tuple(sorted(g)) for g in groups), key=lambda g: (not g, g))
    groups += [()] * (ranks - len(groups))
    return Placement(tuple(groups), tuple(sum(loads[i] for i in g) for g in groups), slots)


def _exact(loads: Sequence[float], ranks: int, per_rank: int) -> List[Tuple[int, ...]]:
    n = len(loads)
    load_of = [sum(loads[i] for i in range(n) if mask >> i & 1) for mask in range(1 << n)]

    @functools.lru_cache(maxsize=None)
    def best(mask: int, left: int) -> Tuple[float, Tuple[int, ...]]:
        """(smallest largest load, the groups as masks) for the experts in mask over `left` ranks."""
        if mask == 0:
            return 0.0, ()
        if left == 0 or bin(mask).count("1") > left * per_rank:
            return float("inf"), ()
        low = mask & -mask  # the lowest remaining expert goes on this rank: ranks are interchangeable
        rest = mask ^ low
        found = (float("inf"), ())
        sub = rest
        while True:
            if bin(sub).count("1") < per_rank:
                group = sub | low
                tail_load, tail = best(mask ^ group, left - 1)
                value = max(load_of[group], tail_load)
                if value < found[0] - 1e-12:
                    found = (value, (group, *tail))
            if sub == 0:
                break
            sub = (sub - 1) & rest
        return found

    _, masks = best((1 << n) - 1, ranks)
    return [tuple(i for i in range(n) if m >> i & 1) for m in masks]


def _greedy(loads: Sequence[float], ranks: int, per_rank: int) -> List[Tuple[int, ...]]:
    groups: List[List[int]] = [[] for _ in range(ranks)]
    totals = [0.0] * ranks
    for expert in sorted(range(len(loads)), key=lambda i: -loads[i]):
        rank = min((r for r in range(ranks) if len(groups[r]) < per_rank), key=lambda r: totals[r])
        groups[rank].append(expert)
        totals[rank] += loads[expert]
    return [tuple(g) for g in groups]
