"""Training data for a run: open the preprocessed datasets, plan the document order, pack the rows.

The default loader assembles each step's micro-batches on demand; `data.loader: dali` (dali_loader.py)
prefetches the same rows through an NVIDIA DALI pipeline.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from ..config import RunConfig
from ..languages import LanguageRegistry
from .batches import MicroBatch, RowBuilder, micro_batches
from .blending import apollo_plan, language_shares, temperature_plan, weighted_plan
from .dataset import DatasetError, PreprocessedDataset
from .holdout import hold_out
from .packing import pack


def open_datasets(cfg: RunConfig, prefixes: Optional[List[str]] = None) -> List[PreprocessedDataset]:
    """The training datasets (or those of `prefixes`), checked to share one tokenizer that fits the model."""
    prefixes = [spec.prefix for spec in cfg.data.datasets] if prefixes is None else prefixes
    datasets = [PreprocessedDataset.open(prefix) for prefix in prefixes]
    first = datasets[0].summary
    for ds in datasets[1:]:
        if (ds.summary["vocab_size"], ds.summary["end_of_text_id"]) != (first["vocab_size"], first["end_of_text_id"]):
            raise DatasetError(f"datasets {datasets[0].prefix!r} and {ds.prefix!r} were tokenized with different "
                               "tokenizers (vocabulary size or end-of-text id differ)")
    if cfg.model.vocab_size is not None and first["vocab_size"] > cfg.model.vocab_size:
        raise DatasetError(f"the datasets use {first['vocab_size']} token ids but model.vocab_size is "
                           f"{cfg.model.vocab_size}")
    return datasets


def training_datasets(cfg: RunConfig):
    """(what training samples from, the documents held out of it for validation): the training datasets minus
    data.validation_fraction of each (data/holdout.py), and those held-out documents."""
    return hold_out(open_datasets(cfg), cfg.data.validation_fraction, cfg.training.seed)


def document_plan(cfg: RunConfig, datasets: List[PreprocessedDataset]):
    data, seed = cfg.data, cfg.training.seed
    if data.sampling == "weighted":
        return weighted_plan([len(ds) for ds in datasets], [spec.weight for spec in data.datasets], seed)
    if data.sampling == "apollo":
        return apollo_plan([ds.sources() for ds in datasets], seed, data.knowledge_sources, data.knowledge_priority,
                           data.knowledge_epochs, data.other_priority, data.other_epochs)
    return temperature_plan([ds.languages() for ds in datasets], [ds.lengths for ds in datasets],
                            data.temperature_alpha, seed)


class TrainingData:
    """The run's rows 0..total_rows (default: every step's global batch)."""

    def __init__(self, cfg: RunConfig, registry: LanguageRegistry, total_rows: Optional[int] = None):
        self.cfg = cfg
        self.datasets, self.held_out = training_datasets(cfg)
        tr = cfg.training
        num_rows = tr.train_steps * tr.global_batch_size if total_rows is None else total_rows
        segments = pack(document_plan(cfg, self.datasets), [ds.lengths for ds in self.datasets],
                        cfg.data.seq_length, num_rows, cfg.data.packing)
        self.builder = RowBuilder(self.datasets, [ds.family_ids(registry) for ds in self.datasets], segments,
                                  cfg.data.seq_length, cfg.data.attention, self.datasets[0].summary["end_of_text_id"])

    def describe(self) -> str:
        data = self.cfg.data
        docs = sum(len(ds) for ds in self.datasets)
        used = len(set(zip(self.builder.segments.dataset.tolist(), self.builder.segments.doc.tolist())))
        held = sum(len(ds) for ds in self.held_out)
        text = (f"data: {len(self.datasets)} dataset(s), {docs:,} documents"
                + (f" ({held:,} more held out for validation)" if held else "") + f"; sampling {data.sampling}; "
                f"{self.builder.num_rows:,} rows of {data.seq_length} tokens ({used:,} distinct documents), "
                f"packing {data.packing} ({padding_share(self.builder):.0%} padding), attention {data.attention}")
        if data.sampling == "temperature":
            shares = language_shares([ds.languages() for ds in self.datasets], [ds.lengths for ds in self.datasets],
                                     data.temperature_alpha)
            text += "; language shares " + " ".join(f"{c} {p:.2f}" for c, p in shares.items())
        return text

    def micro_batches(self, first_row: int, dp_rank: int, dp_size: int) -> List[MicroBatch]:
        """This rank's micro-batches of the global batch that starts at row `first_row`."""
        tr = self.cfg.training
        return micro_batches(self.builder, first_row, tr.global_batch_size, tr.micro_batch_size, dp_rank, dp_size)


def batch_source(data: TrainingData, dp_rank: int, dp_size: int, first_row: int = 0):
    """What the loop asks for micro-batches: the data itself, or a DALI pipeline over the same rows."""
    if data.cfg.data.loader == "default":
        return data
    from .dali_loader import DaliLoader

    tr = data.cfg.training
    return DaliLoader(data.builder, tr.global_batch_size, tr.micro_batch_size, dp_rank, dp_size, first_row)


def padding_share(builder: RowBuilder) -> float:
    """Fraction of row positions that are padding."""
    segments = builder.segments
    return 1.0 - float(np.sum(segments.length)) / (segments.num_rows * builder.seq_length)
