"""Data: JSONL corpora -> documents with family ids -> packed rows -> per-rank micro-batches."""
