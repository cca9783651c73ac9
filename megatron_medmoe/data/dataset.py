"""A dataset `medmoe preprocess` wrote, opened for training: tokens, loss masks, languages, sources."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..languages import LanguageRegistry, LanguageTableError
from .indexed import expected_bin_size


class DatasetError(ValueError):
    """A preprocessed dataset that is missing, incomplete or does not fit the run."""


@dataclass
class PreprocessedDataset:
    prefix: str
    summary: dict
    tokens: object  # megatron-core IndexedDataset
    loss_mask: Optional[object]  # IndexedDataset of uint8, chat datasets only
    lang_index: np.ndarray  # per document: index into summary["languages"]
    source_index: np.ndarray  # per document: index into summary["sources"]

    @staticmethod
    def summary_of(prefix: str) -> dict:
        """The summary PREFIX.json `medmoe preprocess` wrote last; DatasetError when it is missing or unreadable."""
        summary_path = prefix + ".json"
        if not os.path.isfile(summary_path):
            raise DatasetError(f"{summary_path} not found: {prefix!r} is not a complete `medmoe preprocess` output")
        try:
            with open(summary_path, encoding="utf-8") as f:
                summary = json.load(f)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{summary_path} cannot be read as a `medmoe preprocess` summary ({e}): preprocess "
                               "the dataset again") from None
        if not isinstance(summary, dict):
            raise DatasetError(f"{summary_path} is not a `medmoe preprocess` summary: preprocess the dataset again")
        return summary

    @classmethod
    def open(cls, prefix: str) -> "PreprocessedDataset":
        summary = cls.summary_of(prefix)
        needed = [prefix + ext for ext in (".bin", ".idx", ".lang.npy", ".source.npy")]
        if summary.get("format") == "chat":
            needed += [prefix + ".loss_mask.bin", prefix + ".loss_mask.idx"]
        missing = [p for p in needed if not os.path.isfile(p)]
        if missing:
            raise DatasetError(f"dataset {prefix!r} is incomplete: missing {missing}")
        for data in (prefix, prefix + ".loss_mask") if summary.get("format") == "chat" else (prefix,):
            _check_bin_size(prefix, data)
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        tokens = IndexedDataset(prefix)
        loss_mask = IndexedDataset(prefix + ".loss_mask") if summary.get("format") == "chat" else None
        lang_index = np.load(prefix + ".lang.npy", mmap_mode="r")
        source_index = np.load(prefix + ".source.npy", mmap_mode="r")
        if not (len(tokens) == len(lang_index) == len(source_index) == summary["documents"]) or \
                (loss_mask is not None and len(loss_mask) != len(tokens)):
            raise DatasetError(f"dataset {prefix!r} is inconsistent: {len(tokens)} token sequences, "
                               f"{len(lang_index)} languages, {summary['documents']} documents in the summary")
        return cls(prefix, summary, tokens, loss_mask, lang_index, source_index)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.sequence_lengths

    def family_ids(self, registry: LanguageRegistry) -> np.ndarray:
        """Routing id of every document, through the run's language table."""
        try:
            per_language = np.array([registry.expert_id(code) for code in self.summary["languages"]], dtype=np.int64)
        except LanguageTableError as e:
            raise DatasetError(f"dataset {self.prefix!r}: {e}") from e
        return per_language[np.asarray(self.lang_index, dtype=np.int64)]

    def languages(self) -> np.ndarray:
        return np.asarray(self.summary["languages"], dtype=object)[np.asarray(self.lang_index, dtype=np.int64)]

    def sources(self) -> np.ndarray:
        return np.asarray(self.summary["sources"], dtype=object)[np.asarray(self.source_index, dtype=np.int64)]

    def read(self, doc: int, start: int, length: int):
        """(tokens, loss mask) of document `doc` from `start`, `length` tokens."""
        tokens = self.tokens.get(doc, offset=start, length=length).astype(np.int64)
        if self.loss_mask is None:
            return tokens, np.ones(length, dtype=np.float32)
        return tokens, self.loss_mask.get(doc, offset=start, length=length).astype(np.float32)


def _check_bin_size(prefix: str, data: str) -> None:
    """megatron-core maps the .bin as its .idx describes it and fails deep inside on a shorter file (a copy cut
    short, a full disk): check first, and say which file and by how much."""
    try:
        expected = expected_bin_size(data + ".idx")
    except ValueError as e:
        raise DatasetError(f"dataset {prefix!r}: {e}; preprocess it again") from None
    actual = os.path.getsize(data + ".bin")
    if actual != expected:
        raise DatasetError(f"dataset {prefix!r}: {data}.bin has {actual:,} bytes but {data}.idx describes "
                           f"{expected:,} ({'cut short' if actual < expected else 'longer'}: copied incompletely, "
                           "or the two files are from different runs); preprocess it again")
