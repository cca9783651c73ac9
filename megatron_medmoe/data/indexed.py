"""megatron-core's indexed dataset format (.bin + .idx), written as a stream.

The files are exactly what megatron-core's IndexedDatasetBuilder writes (one sequence per document;
megatron-core's IndexedDataset reads them), but the sequence lengths go to a scratch file as they come
instead of a Python list, so memory does not grow with the corpus. Everything is written under a
temporary name and renamed into place by `commit`, so an interrupted run leaves nothing half-written.
"""
from __future__ import annotations

import os
import shutil
import struct
from typing import Sequence

import numpy as np

# megatron-core 0.16 datasets/indexed_dataset.py: the index header and the numeric dtype codes (kept here
# so that preprocessing does not import megatron-core; tests/test_preprocess.py checks the bytes match)
INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
               np.uint16: 8}
_CHUNK = 1 << 20  # sequence lengths per pass when writing the index


class StreamingIndexedWriter:
    def __init__(self, prefix: str, dtype, scratch_suffix: str = ".partial"):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.tmp_prefix = prefix + scratch_suffix
        self._bin = open(self.tmp_prefix + ".bin", "wb")
        self._lengths = open(self.tmp_prefix + ".lengths", "wb")
        self.documents = 0
        self.tokens = 0

    def add_documents(self, flat: np.ndarray, lengths: Sequence[int]) -> None:
        """Append documents given as one flat array and their lengths."""
        lengths = np.asarray(lengths, dtype=np.int32)
        flat = np.asarray(flat)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"document lengths sum to {int(lengths.sum())} but {flat.size} values were given")
        self._bin.write(flat.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.write(lengths.tobytes(order="C"))
        self.documents += len(lengths)
        self.tokens += flat.size

    def finish(self) -> None:
        """Write the index beside the data (still under the temporary name)."""
        self._bin.close()
        self._lengths.close()
        itemsize = np.int64(self.dtype.itemsize)
        lengths_path = self.tmp_prefix + ".lengths"
        with open(self.tmp_prefix + ".idx", "wb") as idx:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", 1))
            idx.write(struct.pack("<B", DTYPE_CODES[self.dtype.type]))
            idx.write(struct.pack("<Q", self.documents))  # sequences: one per document
            idx.write(struct.pack("<Q", self.documents + 1))  # document boundaries, in sequences
            with open(lengths_path, "rb") as f:
                shutil.copyfileobj(f, idx)
            pointer = np.int64(0)
            for chunk in _read_chunks(lengths_path):
                offsets = np.cumsum(chunk.astype(np.int64) * itemsize)
                idx.write((np.concatenate([[0], offsets[:-1]]) + pointer).astype(np.int64).tobytes())
                pointer += offsets[-1]
            start = 0
            while start <= self.documents:  # document i ends at sequence i
                stop = min(start + _CHUNK, self.documents + 1)
                idx.write(np.arange(start, stop, dtype=np.int64).tobytes())
                start = stop
        os.remove(lengths_path)

    def commit(self) -> None:
        for ext in (".bin", ".idx"):
            os.replace(self.tmp_prefix + ext, self.prefix + ext)

    def discard(self) -> None:
        for f in (self._bin, self._lengths):
            f.close()
        for ext in (".bin", ".idx", ".lengths"):
            if os.path.exists(self.tmp_prefix + ext):
                os.remove(self.tmp_prefix + ext)


def _read_chunks(path: str):
    with open(path, "rb") as f:
        while True:
            chunk = np.frombuffer(f.read(_CHUNK * 4), dtype=np.int32)
            if chunk.size == 0:
                return
            yield chunk


def token_dtype(vocab_size: int):
    """megatron-core's choice: uint16 when every id fits, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class StreamingArrayWriter:
    """A 1-D .npy file written as a stream (per-document metadata), renamed into place by `commit`."""

    def __init__(self, path: str, dtype, scratch_suffix: str = ".partial"):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.tmp = path + scratch_suffix
        self._raw = open(self.tmp + ".raw", "wb")
        self.count = 0

    def add(self, values) -> None:
        values = np.asarray(values, dtype=self.dtype)
        self._raw.write(values.tobytes())
        self.count += values.size

    def finish(self) -> None:
        self._raw.close()
        with open(self.tmp, "wb") as out:
            np.lib.format.write_array_header_1_0(
                out, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.count,)})
            with open(self.tmp + ".raw", "rb") as raw:
                shutil.copyfileobj(raw, out)
        os.remove(self.tmp + ".raw")

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self._raw.close()
        for path in (self.tmp, self.tmp + ".raw"):
            if os.path.exists(path):
                os.remove(path)

