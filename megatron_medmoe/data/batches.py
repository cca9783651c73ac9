"""Packed rows -> the tensors of a micro-batch, and each rank's micro-batches of a step.

Per position: the token, its label (the document's next token: labels never cross into another
document, so each document's end-of-text is predicted and the next document's first token is not), the
loss mask (the dataset's mask of the label token: answers only for chat, everything for raw text; 0 for
padding), the family id of its document (padding: the last document's), and the position id.
`attention: shared` lets packed documents see each other, as the released recipe does (positions run
through the row); `per_document` restarts positions at each document piece and masks attention to
each piece.

Every rank computes the same rows, so nothing is broadcast: tensor-parallel ranks and pipeline stages of
one data-parallel replica take the same rows, data-parallel replicas disjoint ones. The data position is
the number of rows consumed (part of the training state), so a resumed run continues at the exact row,
even with another global batch size.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from .dataset import PreprocessedDataset
from .packing import RowSegments

MicroBatch = Dict[str, torch.Tensor]
ATTENTION = ("shared", "per_document")


class RowBuilder:
    def __init__(self, datasets: Sequence[PreprocessedDataset], family_ids: Sequence[np.ndarray],
                 segments: RowSegments, seq_length: int, attention: str, pad_id: int):
        self.datasets, self.family_ids, self.segments = datasets, family_ids, segments
        self.seq_length, self.attention, self.pad_id = seq_length, attention, pad_id
        self.lengths = [ds.lengths for ds in datasets]

    @property
    def num_rows(self) -> int:
        return self.segments.num_rows

    def padding_row(self) -> Dict[str, np.ndarray]:
        """A row of padding only (no loss): fills validation's last global batch."""
        s = self.seq_length
        pad = np.full(s, self.pad_id, dtype=np.int64)
        return {"tokens": pad, "labels": pad.copy(), "loss_mask": np.zeros(s, dtype=np.float32),
                "family_ids": np.zeros(s, dtype=np.int64), "position_ids": np.arange(s, dtype=np.int64),
                "piece": np.zeros(s, dtype=np.int64)}

    def row(self, index: int) -> Dict[str, np.ndarray]:
        s = self.seq_length
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        family = np.zeros(s, dtype=np.int64)
        positions = np.arange(s, dtype=np.int64)
        piece = np.zeros(s, dtype=np.int64)  # which document piece each position belongs to
        at = 0
        for k, (d, doc, start, length) in enumerate(self.segments.segments(index)):
            available = min(length + 1, int(self.lengths[d][doc]) - start)  # one more token for the last label
            ids, mask = self.datasets[d].read(doc, start, available)
            tokens[at:at + length] = ids[:length]
            labels[at:at + available - 1] = ids[1:]
            loss_mask[at:at + available - 1] = mask[1:]
            family[at:at + length] = self.family_ids[d][doc]
            if self.attention == "per_document":
                positions[at:at + length] = np.arange(length)
            piece[at:at + length] = k
            at += length
        if at < s:  # padding: no loss, the last document's family id, a piece of its own
            family[at:] = family[at - 1] if at else 0
            piece[at:] = piece[at - 1] + 1 if at else 0
            if self.attention == "per_document":
                positions[at:] = np.arange(s - at)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "family_ids": family,
                "position_ids": positions, "piece": piece}


def causal_mask(seq_length: int) -> torch.Tensor:
    """megatron-core's attention mask convention: [1, 1, s, s], True where attention is NOT allowed."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1).view(1, 1, seq_length, seq_length)


def document_mask(piece: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] causal attention within each document piece only (True = not allowed)."""
    same = piece.unsqueeze(-1) == piece.unsqueeze(-2)
    s = piece.shape[-1]
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))
    return ~(same & causal).unsqueeze(1)


def collate(rows: List[Dict[str, np.ndarray]], attention: str) -> MicroBatch:
    batch = {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in rows[0]}
    piece = batch.pop("piece")
    seq = piece.shape[-1]
    batch["attention_mask"] = causal_mask(seq) if attention == "shared" else document_mask(piece)
    return batch


def rows_of_batch(first_row: int, global_batch_size: int, dp_rank: int, dp_size: int) -> range:
    """The rows this data-parallel rank reads of the global batch starting at `first_row`."""
    per_rank = global_batch_size // dp_size
    first = first_row + dp_rank * per_rank
    return range(first, first + per_rank)


def micro_batches(builder: RowBuilder, first_row: int, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int) -> List[MicroBatch]:
    """This data-parallel rank's micro-batches of the global batch starting at row `first_row`."""
    rows = [builder.row(r) for r in rows_of_batch(first_row, global_batch_size, dp_rank, dp_size)]
    return [collate(rows[i:i + micro_batch_size], builder.attention) for i in range(0, len(rows), micro_batch_size)]
