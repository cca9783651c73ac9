"""Training batches: an endless, seeded sequence of packed rows, cut into each rank's micro-batches.

Every rank computes the same row sequence on its own, so no data is broadcast: tensor-parallel ranks and
pipeline stages of one data-parallel replica take the same rows, data-parallel replicas disjoint ones.
The position in the data is the number of global batches consumed, so resuming at a step resumes at
the exact row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .packing import PackedRows, pack_documents

MicroBatch = Dict[str, torch.Tensor]


@dataclass
class RowSource:
    """Epoch e packs the documents in the e-th seeded permutation; every epoch has the same row count."""

    documents: Sequence[Tuple[Sequence[int], int]]  # (token ids, family id)
    seq_length: int
    end_of_text: int
    seed: int

    def __post_init__(self):
        self._epoch = -1
        self._rows: PackedRows = self._pack(0)
        self.rows_per_epoch = self._rows.num_rows

    def _pack(self, epoch: int) -> PackedRows:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.documents))
        self._epoch = epoch
        return pack_documents([self.documents[i] for i in order], self.seq_length, self.end_of_text)

    def rows(self, start: int, count: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [count, S+1], family_ids [count, S+1], loss_mask [count, S]) for rows start..start+count."""
        parts = []
        for index in range(start, start + count):
            epoch, offset = divmod(index, self.rows_per_epoch)
            if epoch != self._epoch:
                self._rows = self._pack(epoch)
            parts.append((self._rows.tokens[offset], self._rows.family_ids[offset], self._rows.loss_mask[offset]))
        return tuple(np.stack(column) for column in zip(*parts))


def causal_mask(seq_length: int) -> torch.Tensor:
    """megatron-core's attention mask convention: [1, 1, s, s], True where attention is NOT allowed."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1).view(1, 1, seq_length, seq_length)


def micro_batches(source: RowSource, step: int, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int) -> List[MicroBatch]:
    """This data-parallel rank's micro-batches of global batch `step`."""
    per_rank = global_batch_size // dp_size
    first = step * global_batch_size + dp_rank * per_rank
    seq = source.seq_length
    mask = causal_mask(seq)
    positions = torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(micro_batch_size, seq)
    out = []
    for m in range(per_rank // micro_batch_size):
        tokens, families, loss_mask = source.rows(first + m * micro_batch_size, micro_batch_size)
        tokens = torch.from_numpy(tokens)
        out.append({
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.from_numpy(loss_mask),
            "family_ids": torch.from_numpy(families[:, :-1]).contiguous(),
            "position_ids": positions,
            "attention_mask": mask,
        })
    return out


def text_row_source(paths: Sequence[str], registry, tokenizer, seq_length: int, seed: int,
                    language_field: str = "lang") -> RowSource:
    """Read and tokenize raw-text JSONL documents (small corpora: everything is held in memory)."""
    from .text_corpus import read_text_documents
    from .tokenizer import end_of_text_id

    docs = list(read_text_documents(paths, registry, language_field))
    token_ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    return RowSource(documents=[(ids, d.family_id) for ids, d in zip(token_ids, docs)], seq_length=seq_length,
                     end_of_text=end_of_text_id(tokenizer), seed=seed)
