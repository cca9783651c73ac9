"""The order in which documents are trained on: an endless, seeded stream of (dataset, document) pairs.

- weighted: each dataset supplies a share of the documents proportional to its weight (the dataset
  furthest behind its share goes next, as megatron-core's blending does); within a dataset, documents
  come in a seeded permutation, a fresh one each pass.
- apollo: ApolloMoE's recipe. Every document enters a pool once per epoch of its source (knowledge Q&A
  sources once, everything else twice) with its source's priority (16 and 2), and ONE weighted
  permutation without replacement orders the pool: most knowledge early, most exams and dialogues late.
  When the pool is used up, the next pass draws a new permutation.
- temperature: languages take turns with probability proportional to (tokens of the language)^alpha;
  each language's documents come in a seeded permutation.
The stream depends only on the datasets, the options and the seed, so every rank computes the same one.
"""
from __future__ import annotations

import fnmatch
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

BLOCK = 8192
SAMPLING = ("weighted", "apollo", "temperature")
Plan = Iterator[Tuple[np.ndarray, np.ndarray]]  # blocks of (dataset index, document index)


def _permutations(count: int, seed: Sequence[int]) -> Iterator[int]:
    epoch = 0
    while True:
        yield from np.random.default_rng([*seed, epoch]).permutation(count).tolist()
        epoch += 1


def _deficit_choices(weights: np.ndarray) -> Iterator[int]:
    """Index sequence whose running counts follow `weights` as closely as possible (deterministic)."""
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = np.zeros(len(weights))
    n = 0
    while True:
        n += 1
        choice = int(np.argmax(weights * n - counts))
        counts[choice] += 1
        yield choice


def weighted_plan(sizes: Sequence[int], weights: Sequence[float], seed: int) -> Plan:
    streams = [_permutations(size, (seed, d)) for d, size in enumerate(sizes)]
    choices = _deficit_choices(np.asarray(weights))
    while True:
        ds = np.fromiter((next(choices) for _ in range(BLOCK)), dtype=np.int64, count=BLOCK)
        yield ds, np.fromiter((next(streams[d]) for d in ds.tolist()), dtype=np.int64, count=BLOCK)


def knowledge_mask(sources: np.ndarray, patterns: Sequence[str]) -> np.ndarray:
    names = {name: any(fnmatch.fnmatchcase(name, p) for p in patterns) for name in set(sources.tolist())}
    return np.fromiter((names[s] for s in sources.tolist()), dtype=bool, count=len(sources))


def apollo_plan(sources: Sequence[np.ndarray], seed: int, knowledge_patterns: Sequence[str],
                knowledge_priority: float, knowledge_epochs: int, other_priority: float, other_epochs: int) -> Plan:
    ds_parts, doc_parts, weight_parts = [], [], []
    for d, per_doc in enumerate(sources):
        knowledge = knowledge_mask(np.asarray(per_doc), knowledge_patterns)
        docs = np.arange(len(per_doc), dtype=np.int64)
        for is_knowledge, priority, epochs in ((True, knowledge_priority, knowledge_epochs),
                                               (False, other_priority, other_epochs)):
            chosen = docs[knowledge == is_knowledge]
            for _ in range(epochs):
                ds_parts.append(np.full(len(chosen), d, dtype=np.int64))
                doc_parts.append(chosen)
                weight_parts.append(np.full(len(chosen), float(priority)))
    pool_ds, pool_doc = np.concatenate(ds_parts), np.concatenate(doc_parts)
    log_weights = np.log(np.concatenate(weight_parts))
    if len(pool_ds) == 0:
        raise ValueError("the apollo recipe has an empty pool: every source has 0 epochs")
    passes = 0
    while True:
        # weighted sampling without replacement (Efraimidis-Spirakis): sort by log(u) / w, largest first
        u = np.random.default_rng([seed, passes]).random(len(pool_ds))
        order = np.argsort(-(np.log(u) / np.exp(log_weights)), kind="stable")
        for start in range(0, len(order), BLOCK):
            part = order[start:start + BLOCK]
            yield pool_ds[part], pool_doc[part]
        passes += 1


def temperature_plan(languages: Sequence[np.ndarray], lengths: Sequence[np.ndarray], alpha: float, seed: int) -> Plan:
    members: Dict[str, List[Tuple[int, int]]] = {}
    tokens: Dict[str, int] = {}
    for d, (langs, lens) in enumerate(zip(languages, lengths)):
        for doc, (code, n) in enumerate(zip(np.asarray(langs).tolist(), np.asarray(lens).tolist())):
            members.setdefault(code, []).append((d, doc))
            tokens[code] = tokens.get(code, 0) + int(n)
    codes = sorted(members)
    probs = np.array([tokens[c] for c in codes], dtype=np.float64) ** alpha
    streams = [_permutations(len(members[c]), (seed, i)) for i, c in enumerate(codes)]
    choices = _deficit_choices(probs)
    while True:
        pairs = [members[codes[c]][next(streams[c])] for c in (next(choices) for _ in range(BLOCK))]
        arr = np.asarray(pairs, dtype=np.int64)
        yield arr[:, 0], arr[:, 1]


def language_shares(languages: Sequence[np.ndarray], lengths: Sequence[np.ndarray], alpha: float) -> Dict[str, float]:
    """The temperature sampling probability of each language (for logs and tests)."""
    tokens: Dict[str, int] = {}
    for langs, lens in zip(languages, lengths):
        for code, n in zip(np.asarray(langs).tolist(), np.asarray(lens).tolist()):
            tokens[code] = tokens.get(code, 0) + int(n)
    weights = {c: t ** alpha for c, t in tokens.items()}
    total = sum(weights.values())
    return {c: w / total for c, w in sorted(weights.items())}
