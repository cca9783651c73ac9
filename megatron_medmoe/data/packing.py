"""Pack tokenized documents into rows of `seq_length` tokens, every token tagged with its family id.

Documents are concatenated (each followed by end-of-text) into one stream and cut into rows: a document
longer than a row continues in the next row, never dropped. Row i holds stream tokens
[i * seq_length, (i + 1) * seq_length] (one extra token for the labels). The tail of the last row is
padding: end-of-text tokens that carry the last document's family id and have no loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class PackedRows:
    tokens: np.ndarray  # [rows, seq_length + 1] int64: inputs are [:, :-1], labels [:, 1:]
    family_ids: np.ndarray  # [rows, seq_length + 1] int64: family of each token's document
    loss_mask: np.ndarray  # [rows, seq_length] float32: 0 where the label is padding

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


def pack_documents(documents: Sequence[Tuple[Sequence[int], int]], seq_length: int, end_of_text: int) -> PackedRows:
    """documents: (token ids, family id) pairs in packing order."""
    if not documents:
        raise ValueError("nothing to pack: no documents")
    lengths = np.array([len(ids) + 1 for ids, _ in documents], dtype=np.int64)
    stream = np.empty(int(lengths.sum()), dtype=np.int64)
    families = np.repeat(np.array([fam for _, fam in documents], dtype=np.int64), lengths)
    pos = 0
    for (ids, _), n in zip(documents, lengths):
        stream[pos:pos + n - 1] = ids
        stream[pos + n - 1] = end_of_text
        pos += n
    real = len(stream)
    num_rows = max(1, -(-(real - 1) // seq_length))  # enough rows for every real label
    total = num_rows * seq_length + 1
    padded_stream = np.full(total, end_of_text, dtype=np.int64)
    padded_families = np.full(total, families[-1], dtype=np.int64)
    padded_stream[:real], padded_families[:real] = stream, families
    starts = np.arange(num_rows)[:, None] * seq_length + np.arange(seq_length + 1)[None, :]
    label_positions = starts[:, 1:]
    loss_mask = (label_positions < real).astype(np.float32)
    return PackedRows(tokens=padded_stream[starts], family_ids=padded_families[starts], loss_mask=loss_mask)
