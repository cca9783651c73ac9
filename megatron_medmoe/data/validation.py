"""The validation rows: the data.validation datasets and the documents held out of the training datasets.

All validation documents in one seeded order, packed as training packs (data.packing, data.attention), once,
into at most training.eval_iters global batches; the last batch is filled with padding rows (no loss), so no
validation document is left out of the rows that exist and none is counted twice. The rows are the same at
every validation of a run, its resumed runs included (unlike Megatron-LM, whose validation iterator walks on),
so successive validation losses compare like with like.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

from ..config import RunConfig
from ..languages import LanguageRegistry
from .batches import MicroBatch, RowBuilder, collate, rows_of_batch
from .dataset import DatasetError
from .packing import pack


def validation_plan(sizes: Sequence[int], seed: int):
    """Every (dataset, document) once, in a seeded order: a finite plan."""
    ds = np.concatenate([np.full(n, d, dtype=np.int64) for d, n in enumerate(sizes)] or [np.empty(0, np.int64)])
    doc = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes] or [np.empty(0, np.int64)])
    order = np.random.default_rng([seed, 0x7A11D, 1]).permutation(len(ds))
    yield ds[order], doc[order]


class ValidationData:
    def __init__(self, cfg: RunConfig, registry: LanguageRegistry, training_datasets: Sequence, held_out: Sequence):
        """training_datasets: what the run trains on (for the tokenizer check); held_out: documents held out of it."""
        from .loader import open_datasets

        self.cfg = cfg
        listed = open_datasets(cfg, [spec.prefix for spec in cfg.data.validation]) if cfg.data.validation else []
        if listed and training_datasets:
            ours, theirs = listed[0].summary, training_datasets[0].summary
            if (ours["vocab_size"], ours["end_of_text_id"]) != (theirs["vocab_size"], theirs["end_of_text_id"]):
                raise DatasetError(f"validation dataset {listed[0].prefix!r} and training dataset "
                                   f"{training_datasets[0].prefix!r} were tokenized with different tokenizers "
                                   "(vocabulary size or end-of-text id differ)")
        self.datasets: List = [*listed, *held_out]
        self.listed, self.held = len(listed), sum(len(ds) for ds in held_out)
        tr = cfg.training
        if self.datasets:
            segments = pack(validation_plan([len(ds) for ds in self.datasets], tr.seed),
                            [ds.lengths for ds in self.datasets], cfg.data.seq_length,
                            tr.eval_iters * tr.global_batch_size, cfg.data.packing)
            self.builder = RowBuilder(self.datasets, [ds.family_ids(registry) for ds in self.datasets], segments,
                                      cfg.data.seq_length, cfg.data.attention,
                                      self.datasets[0].summary["end_of_text_id"])
            self.rows = self.builder.num_rows
        else:
            self.builder, self.rows = None, 0
        self.iterations = math.ceil(self.rows / tr.global_batch_size)

    def __bool__(self) -> bool:
        return self.rows > 0

    def describe(self) -> str:
        parts = [f"{self.listed} validation dataset(s)"] if self.listed else []
        if self.held:
            parts.append(f"{self.held:,} documents held out of the training datasets")
        docs = len(set(zip(self.builder.segments.dataset.tolist(), self.builder.segments.doc.tolist())))
        return (f"validation: {' and '.join(parts)}; {self.rows:,} rows of {self.cfg.data.seq_length} tokens "
                f"({docs:,} documents) in {self.iterations} global batch(es), "
                + (f"every {self.cfg.training.eval_interval} steps and " if self.cfg.training.eval_interval else "")
                + "after the last step")

    def micro_batches(self, iteration: int, dp_rank: int, dp_size: int) -> List[MicroBatch]:
        """This data-parallel rank's micro-batches of validation batch `iteration` (rows past the last are padding)."""
        tr = self.cfg.training
        rows = [self.builder.row(r) if r < self.rows else self.builder.padding_row()
                for r in rows_of_batch(iteration * tr.global_batch_size, tr.global_batch_size, dp_rank, dp_size)]
        return [collate(rows[i:i + tr.micro_batch_size], self.builder.attention)
                for i in range(0, len(rows), tr.micro_batch_size)]
