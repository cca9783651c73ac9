"""megatron-core's indexed dataset format (.bin + .idx), written as a stream.

The files are exactly what megatron-core's IndexedDatasetBuilder writes (one sequence per document;
megatron-core's IndexedDataset reads them), but the sequence lengths go to a scratch file as they come
instead of a Python list, so memory does not grow with the corpus. Everything is written aside (a
`ScratchFile`) and put in place by `commit`, so an interrupted run leaves nothing half-written.
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
# Linux: a file can be created with no name (O_TMPFILE) and linked into a directory later through
# /proc/self/fd; where either is missing, scratch files get a `.partial` name instead.
_ANONYMOUS = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")


class ScratchFile:
    """A binary file (read-write) that becomes `path` only at `commit`. Anonymous where the file system
    allows, so that a process killed even by SIGKILL, or by the out-of-memory killer, leaves nothing behind
    (the kernel frees the data with the last descriptor); elsewhere `path.partial`, removed by `discard`."""

    def __init__(self, path: str):
        self.path = path
        self.partial = None
        fd = None
        if _ANONYMOUS:
            try:
                fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_TMPFILE | os.O_RDWR, 0o666)
            except OSError:  # this file system has no unnamed files
                fd = None
        if fd is None:
            self.partial = path + ".partial"
            fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self.file = os.fdopen(fd, "w+b")

    def commit(self) -> None:
        """Put the file in place under `path` (replacing what was there) and close it."""
        self.file.flush()
        if self.partial is not None:
            os.replace(self.partial, self.path)
        else:
            if os.path.lexists(self.path):  # link() never replaces
                os.remove(self.path)
            proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
            try:  # linkat(AT_SYMLINK_FOLLOW) of the descriptor's /proc entry names the unnamed file
                os.link(str(self.file.fileno()), self.path, src_dir_fd=proc, follow_symlinks=True)
            finally:
                os.close(proc)
        self.file.close()

    def discard(self) -> None:
        self.file.close()
        if self.partial is not None and os.path.exists(self.partial):
            os.remove(self.partial)


class StreamingIndexedWriter:
    def __init__(self, prefix: str, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._bin = ScratchFile(prefix + ".bin")
        self._lengths = ScratchFile(prefix + ".lengths")  # never published: the index is made from it
        self._idx = None
        self.documents = 0
        self.tokens = 0

    def add_documents(self, flat: np.ndarray, lengths: Sequence[int]) -> None:
        """Append documents given as one flat array and their lengths."""
        lengths = np.asarray(lengths, dtype=np.int32)
        flat = np.asarray(flat)
        if int(lengths.sum()) != flat.size:
            raise ValueError(f"document lengths sum to {int(lengths.sum())} but {flat.size} values were given")
        self._bin.file.write(flat.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.file.write(lengths.tobytes(order="C"))
        self.documents += len(lengths)
        self.tokens += flat.size

    def finish(self) -> None:
        """Write the index beside the data (both still aside)."""
        itemsize = np.int64(self.dtype.itemsize)
        lengths = self._lengths.file
        self._idx = ScratchFile(self.prefix + ".idx")
        idx = self._idx.file
        idx.write(INDEX_HEADER)
        idx.write(struct.pack("<Q", 1))
        idx.write(struct.pack("<B", DTYPE_CODES[self.dtype.type]))
        idx.write(struct.pack("<Q", self.documents))  # sequences: one per document
        idx.write(struct.pack("<Q", self.documents + 1))  # document boundaries, in sequences
        lengths.seek(0)
        shutil.copyfileobj(lengths, idx)
        pointer = np.int64(0)
        for chunk in _read_chunks(lengths):
            offsets = np.cumsum(chunk.astype(np.int64) * itemsize)
            idx.write((np.concatenate([[0], offsets[:-1]]) + pointer).astype(np.int64).tobytes())
            pointer += offsets[-1]
        start = 0
        while start <= self.documents:  # document i ends at sequence i
            stop = min(start + _CHUNK, self.documents + 1)
            idx.write(np.arange(start, stop, dtype=np.int64).tobytes())
            start = stop
        self._lengths.discard()

    def commit(self) -> None:
        self._bin.commit()
        self._idx.commit()

    def discard(self) -> None:
        for scratch in (self._bin, self._lengths, self._idx):
            if scratch is not None:
                scratch.discard()


def _read_chunks(f):
    f.seek(0)
    while True:
        chunk = np.frombuffer(f.read(_CHUNK * 4), dtype=np.int32)
        if chunk.size == 0:
            return
        yield chunk


def expected_bin_size(idx_path: str) -> int:
    """The size in bytes of the .bin that an .idx describes (the end of its last sequence); ValueError, saying
    what is wrong, for an .idx that is not one or is cut short."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != INDEX_HEADER:
            raise ValueError(f"{idx_path} is not a megatron-core index (bad header)")
        code = head[17]
        itemsize = next((np.dtype(t).itemsize for t, c in DTYPE_CODES.items() if c == code), None)
        sequences, documents = struct.unpack("<QQ", head[18:34])
        if itemsize is None or 34 + 12 * sequences + 8 * documents > size:
            raise ValueError(f"{idx_path} is cut short or damaged: {size:,} bytes for {sequences:,} sequences")
        if sequences == 0:
            return 0
        f.seek(34 + 4 * (sequences - 1))
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(34 + 4 * sequences + 8 * (sequences - 1))
        (last_pointer,) = struct.unpack("<q", f.read(8))
    return last_pointer + last_length * itemsize


def token_dtype(vocab_size: int):
    """megatron-core's choice: uint16 when every id fits, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class StreamingArrayWriter:
    """A 1-D .npy file written as a stream (per-document metadata), put in place by `commit`."""

    def __init__(self, path: str, dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self._raw = ScratchFile(path + ".raw")  # the values; the header needs their count first
        self._out = None
        self.count = 0

    def add(self, values) -> None:
        values = np.asarray(values, dtype=self.dtype)
        self._raw.file.write(values.tobytes())
        self.count += values.size

    def finish(self) -> None:
        self._out = ScratchFile(self.path)
        np.lib.format.write_array_header_1_0(
            self._out.file,
            {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.count,)})
        self._raw.file.seek(0)
        shutil.copyfileobj(self._raw.file, self._out.file)
        self._raw.discard()

    def commit(self) -> None:
        self._out.commit()

    def discard(self) -> None:
        for scratch in (self._raw, self._out):
            if scratch is not None:
                scratch.discard()

