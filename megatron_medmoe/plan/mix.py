"""The recipe's expected token share per family expert: read from its preprocessed datasets through the
same document plan training uses (weighted, apollo or temperature sampling), or given as --mix."""
from __future__ import annotations

import itertools
from typing import Dict, List, Sequence

import numpy as np

from ..config import RunConfig
from ..languages import LanguageRegistry, LanguageTableError

MAX_DOCUMENTS = 1_000_000  # documents drawn from the plan: one pass over the pool, at most this many


class MixError(ValueError):
    """The token mix cannot be known: no datasets and no --mix, or a --mix entry that names nothing."""


def shares_from_data(cfg: RunConfig, registry: LanguageRegistry) -> List[float]:
    """Token share per expert of the documents training would draw first (one pass of the plan)."""
    from ..data.dataset import DatasetError
    from ..data.loader import document_plan, training_datasets

    if not cfg.data.datasets:
        raise MixError("the recipe lists no data.datasets: give the expected mix with --mix CODE=TOKENS ...")
    try:
        datasets, _ = training_datasets(cfg)
    except DatasetError as e:
        raise MixError(f"{e}: preprocess the data first, or give the expected mix with --mix CODE=TOKENS ...") from e
    families = [ds.family_ids(registry) for ds in datasets]
    lengths = [np.asarray(ds.lengths, dtype=np.int64) for ds in datasets]
    pool = sum(len(ds) for ds in datasets)
    if cfg.data.sampling == "apollo":
        pool *= max(cfg.data.knowledge_epochs, cfg.data.other_epochs)
    want = min(pool, MAX_DOCUMENTS)
    tokens = np.zeros(registry.num_experts, dtype=np.float64)
    drawn = 0
    for ds_idx, doc_idx in itertools.takewhile(lambda _: drawn < want, document_plan(cfg, datasets)):
        take = min(len(ds_idx), want - drawn)
        for d in range(len(datasets)):
            sel = doc_idx[:take][ds_idx[:take] == d]
            np.add.at(tokens, families[d][sel], lengths[d][sel])
        drawn += take
    return (tokens / tokens.sum()).tolist()


def shares_from_mix(entries: Sequence[str], registry: LanguageRegistry) -> List[float]:
    """--mix entries NAME=AMOUNT (a language code or a family name; amounts in any unit, e.g. tokens)."""
    amounts: Dict[int, float] = {}
    by_name = {name.lower(): i for i, name in enumerate(registry.experts)}
    for entry in entries:
        name, sep, value = entry.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not sep or amount < 0:
            raise MixError(f"--mix {entry!r}: expected NAME=AMOUNT with a language code or family name and a "
                           "non-negative number, e.g. en=1.08e9")
        if name.lower() in by_name:
            expert = by_name[name.lower()]
        else:
            try:
                expert = registry.expert_id(name)
            except LanguageTableError as e:
                raise MixError(f"--mix {entry!r}: {name!r} is neither a family ({', '.join(registry.experts)}) "
                               f"nor a language code: {e}") from e
        amounts[expert] = amounts.get(expert, 0.0) + amount
    total = sum(amounts.values())
    if total <= 0:
        raise MixError("--mix: the amounts add up to 0")
    return [amounts.get(i, 0.0) / total for i in range(registry.num_experts)]
