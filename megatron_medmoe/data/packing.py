"""Packing the document stream into rows of `seq_length` tokens; nothing is ever dropped.

- whole_documents (the released recipe): documents go into the current row while they fit; one that does
  not fit (but would fit an empty row) closes the row, whose tail becomes padding, and starts the next.
- continuous (megatron-core's GPT datasets): documents are concatenated and cut at row boundaries, so a
  document may start in one row and end in the next; no padding.
Either way a document longer than a row fills the current row and continues in the following ones. A
finite plan (the validation documents, once) ends with its last row, however full, so fewer rows may come back.
A row is a list of segments (dataset, document, start, length).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .blending import Plan


@dataclass(frozen=True)
class RowSegments:
    row_ptr: np.ndarray  # [rows + 1]: row r is segments row_ptr[r]:row_ptr[r+1]
    dataset: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1

    def segments(self, row: int):
        lo, hi = self.row_ptr[row], self.row_ptr[row + 1]
        return zip(self.dataset[lo:hi].tolist(), self.doc[lo:hi].tolist(), self.start[lo:hi].tolist(),
                   self.length[lo:hi].tolist())


PACKING = ("whole_documents", "continuous")


def pack(plan: Plan, lengths: Sequence[np.ndarray], seq_length: int, num_rows: int,
         packing: str = "whole_documents") -> RowSegments:
    seg_ds, seg_doc, seg_start, seg_len, row_ptr = [], [], [], [], [0]
    fill = 0
    documents = ((d, i) for ds, doc in plan for d, i in zip(ds.tolist(), doc.tolist()))
    for d, i in documents:
        n = int(lengths[d][i])
        if packing == "whole_documents" and 0 < fill and fill + n > seq_length >= n:  # pad, start the next row
            row_ptr.append(len(seg_ds))
            fill = 0
        pos = 0
        while pos < n and len(row_ptr) <= num_rows:
            take = min(seq_length - fill, n - pos)
            seg_ds.append(d)
            seg_doc.append(i)
            seg_start.append(pos)
            seg_len.append(take)
            fill += take
            pos += take
            if fill == seq_length:
                row_ptr.append(len(seg_ds))
                fill = 0
        if len(row_ptr) > num_rows:
            break
    else:  # a finite plan (validation's one pass) ran out: its last row ends with padding
        if fill > 0:
            row_ptr.append(len(seg_ds))
    row_ptr = row_ptr[: num_rows + 1]
    end = row_ptr[-1]
    as_array = lambda values: np.asarray(values[:end], dtype=np.int64)  # noqa: E731
    return RowSegments(np.asarray(row_ptr, dtype=np.int64), as_array(seg_ds), as_array(seg_doc),
                       as_array(seg_start), as_array(seg_len))
