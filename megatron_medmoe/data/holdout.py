"""Documents held out of a training dataset for validation (data.validation_fraction), and a dataset seen
through a subset of its documents.

Which documents are held out depends only on the dataset's document count, the fraction, the seed and the
dataset's place in data.datasets, so every rank, every layout and every resumed run holds out the same ones;
training never sees them (its sampling plans are made over the rest), validation sees only them.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from ..languages import LanguageRegistry
from .dataset import DatasetError, PreprocessedDataset


def held_out_count(documents: int, fraction: float) -> int:
    """round(fraction x documents), at least one and never all of them; 0 when nothing is held out."""
    if fraction <= 0:
        return 0
    return min(max(int(round(fraction * documents)), 1), documents - 1)


def split_documents(documents: int, fraction: float, seed: int, dataset_index: int) -> Tuple[np.ndarray, np.ndarray]:
    """(training documents, held-out documents), each in increasing order."""
    held = held_out_count(documents, fraction)
    chosen = np.zeros(documents, dtype=bool)
    chosen[np.random.default_rng([seed, dataset_index, 0x7A11D]).permutation(documents)[:held]] = True
    return np.flatnonzero(~chosen), np.flatnonzero(chosen)


class DocumentSubset:
    """A PreprocessedDataset restricted to some of its documents, numbered 0..len-1 in their order; what the
    sampling plans, packing and row building read."""

    def __init__(self, dataset: PreprocessedDataset, documents: np.ndarray):
        self.dataset, self.documents = dataset, np.asarray(documents, dtype=np.int64)
        self.prefix, self.summary = dataset.prefix, dataset.summary
        self.lengths = np.asarray(dataset.lengths)[self.documents]

    def __len__(self) -> int:
        return len(self.documents)

    def family_ids(self, registry: LanguageRegistry) -> np.ndarray:
        return self.dataset.family_ids(registry)[self.documents]

    def languages(self) -> np.ndarray:
        return self.dataset.languages()[self.documents]

    def sources(self) -> np.ndarray:
        return self.dataset.sources()[self.documents]

    def read(self, doc: int, start: int, length: int):
        return self.dataset.read(int(self.documents[doc]), start, length)


def hold_out(datasets, fraction: float, seed: int):
    """(training views, held-out views) of each dataset; the datasets themselves when nothing is held out."""
    if fraction <= 0:
        return list(datasets), []
    train, held = [], []
    for d, ds in enumerate(datasets):
        if len(ds) < 2:
            raise DatasetError(f"dataset {ds.prefix!r} has {len(ds)} document(s): data.validation_fraction needs at "
                               "least 2 to hold some out and train on the rest; list a validation set in "
                               "data.validation instead")
        kept, out = split_documents(len(ds), fraction, seed, d)
        train.append(DocumentSubset(ds, kept))
        held.append(DocumentSubset(ds, out))
    return train, held
