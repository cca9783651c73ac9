"""`data.loader: dali`: the same rows as the default loader, prefetched through an NVIDIA DALI pipeline.

A parallel external source (a DALI worker process) assembles this data-parallel rank's rows, in order,
from the packed segments and the indexed token shards; DALI keeps `prefetch` micro-batches ready ahead of
training. CPU pipelines (device_id None) where there is no GPU. Global batches must be read in order,
starting at the row the loader was built for (a resumed run builds it at its data position).
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from .batches import MicroBatch, RowBuilder, causal_mask, document_mask, rows_of_batch

FIELDS = ("tokens", "labels", "loss_mask", "family_ids", "position_ids", "piece")


class RankRows:
    """DALI sample source: sample i is the i-th row this rank reads from row `first_row` on."""

    def __init__(self, builder: RowBuilder, global_batch_size: int, dp_rank: int, dp_size: int, first_row: int):
        self.builder = builder
        self.rows = [r for start in range(first_row, builder.num_rows - global_batch_size + 1, global_batch_size)
                     for r in rows_of_batch(start, global_batch_size, dp_rank, dp_size)]

    def __call__(self, sample_info):
        if sample_info.idx_in_epoch >= len(self.rows):
            raise StopIteration
        row = self.builder.row(self.rows[sample_info.idx_in_epoch])
        return tuple(np.ascontiguousarray(row[key]) for key in FIELDS)


class DaliLoader:
    def __init__(self, builder: RowBuilder, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, first_row: int, prefetch: int = 2, workers: int = 1):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.attention = builder.attention
        self.per_rank = global_batch_size // dp_size
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.next_row = first_row
        source = RankRows(builder, global_batch_size, dp_rank, dp_size, first_row)
        dtypes = [types.INT64, types.INT64, types.FLOAT, types.INT64, types.INT64, types.INT64]
        device_id = torch.cuda.current_device() if torch.cuda.is_available() else None

        @pipeline_def(batch_size=micro_batch_size, num_threads=1, device_id=device_id,
                      prefetch_queue_depth=prefetch, py_num_workers=workers, py_start_method="spawn")
        def rows_pipeline():
            outputs = fn.external_source(source=source, num_outputs=len(FIELDS), batch=False, parallel=True,
                                         dtype=dtypes)
            return tuple(outputs)

        pipeline = rows_pipeline()
        pipeline.build()
        self._batches = iter(DALIGenericIterator(pipeline, list(FIELDS), auto_reset=False))

    def micro_batches(self, first_row: int, dp_rank: int, dp_size: int) -> List[MicroBatch]:
        if first_row != self.next_row:
            raise RuntimeError(f"the DALI loader serves global batches in order: expected the one at row "
                               f"{self.next_row}, got row {first_row}")
        self.next_row += self.global_batch_size
        out = []
        for _ in range(self.per_rank // self.micro_batch_size):
            batch = dict(next(self._batches)[0])
            piece = batch.pop("piece")
            batch["attention_mask"] = (causal_mask(piece.shape[-1]) if self.attention == "shared"
                                       else document_mask(piece))
            out.append(batch)
        return out
