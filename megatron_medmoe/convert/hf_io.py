"""Hugging Face safetensors checkpoints, one tensor at a time, in either direction.

The format is a little-endian u64 header length, a JSON header (name -> dtype, shape, byte range) and the
tensor bytes. Reading parses each file's header once and reads one tensor's byte range into a fresh tensor
when asked; writing knows every tensor's shape beforehand, so it assigns tensors to size-limited shards,
writes each shard's header first and then each tensor's bytes as it arrives. Memory holds one tensor, not a
shard or the model. Shards are `model-0000K-of-0000N.safetensors` with `model.safetensors.index.json`, or a
single `model.safetensors`.
"""
from __future__ import annotations

import json
import os
import struct
from typing import BinaryIO, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .errors import ConvertError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}  # every safetensors dtype, read or not


def _bytes_of(tensor: torch.Tensor):
    """The tensor's raw bytes as a buffer, without a copy (bfloat16 included)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data


def _read_header(path: str) -> Tuple[dict, int]:
    """(tensor name -> header entry, where the data starts), every entry checked against the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error) as e:
        raise ConvertError(f"{path}: cannot read it as safetensors ({e})") from e
    base = 8 + length
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    ranges = sorted((_byte_range(path, key, entry), key) for key, entry in entries.items())
    for (first, previous), (second, key) in zip(ranges, ranges[1:]):
        if second[0] < first[1]:  # overlapping tensors would read each other's bytes without complaint
            raise ConvertError(f"{path}: the safetensors header is damaged: the byte ranges of {previous!r} "
                               f"{list(first)} and {key!r} {list(second)} overlap")
    end, last = max(((r[1], k) for r, k in ranges), default=(0, None))
    if base + end > size:
        raise ConvertError(f"{path}: cannot read it as safetensors (truncated, or its header is damaged: "
                           f"{last!r} ends at byte {base + end}, the file has {size}); is the file complete?")
    return entries, base


def _byte_range(path: str, key: str, entry) -> Tuple[int, int]:
    """A header entry's data_offsets, checked against its dtype and shape."""
    def bad(what):
        return ConvertError(f"{path}: the safetensors header's entry for {key!r} is damaged: {what}")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise bad("the entry is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise bad(f"dtype {dtype!r} is not a safetensors dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} is not a byte range [begin, end]")
    need = _numel(shape) * ITEM_BYTES[dtype]
    if offsets[1] - offsets[0] != need:
        raise bad(f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes where {dtype} {shape} needs {need}")
    return offsets[0], offsets[1]


class HFTensors:
    """The tensors of a Hugging Face model directory, by name."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ConvertError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(directory, SINGLE)):
            weight_map, files = None, [SINGLE]
        else:
            raise ConvertError(f"{directory}: no {SINGLE} and no {INDEX} (only safetensors checkpoints are read)")
        self.info: Dict[str, Tuple[str, int, dict]] = {}  # name -> (file, data start, header entry)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise ConvertError(f"{path} does not exist (named by {INDEX})")
            header, base = _read_header(path)
            for key, entry in header.items():
                self.info[key] = (path, base, entry)
        if weight_map:
            stray = sorted(k for k, f in weight_map.items() if k not in self.info)
            if stray:
                raise ConvertError(f"{index} names {len(stray)} tensor(s) its files do not hold, e.g. "
                                   f"{stray[0]!r} in {weight_map[stray[0]]}")

    def __contains__(self, key: str) -> bool:
        return key in self.info

    def keys(self) -> Iterable[str]:
        return self.info.keys()

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.info[key][2]["shape"])

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.info:
            raise ConvertError(f"{self.directory}: tensor {key!r} is missing")
        path, base, entry = self.info[key]
        if entry["dtype"] not in DTYPES:
            raise ConvertError(f"{path}: {key} has dtype {entry['dtype']}, which is not supported")
        tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]  # checked against dtype, shape and the file when the header was read
        with open(path, "rb") as f:
            f.seek(base + begin)
            if tensor.numel() and f.readinto(_bytes_of(tensor)) != end - begin:
                raise ConvertError(f"{path}: {key} is cut short; is the file complete?")
        return tensor


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '200KB' or a number of bytes."""
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    upper = text.strip().upper()
    try:
        for unit, factor in units.items():
            if upper.endswith(unit):
                return int(float(upper[:-len(unit)]) * factor)
        return int(upper)
    except ValueError:
        raise ConvertError(f"--max-shard-size {text!r}: expected a size such as 5GB or 500MB") from None


class ShardedOut:
    """Writes planned tensors (name, shape, dtype), in plan order, into size-limited shards."""

    def __init__(self, directory: str, plan: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.directory = directory
        self.shards: List[List[Tuple[str, Tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        count = len(self.shards)
        self.files = [SINGLE] if count == 1 else [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
        self.order = [(k, item) for k, shard in enumerate(self.shards) for item in shard]
        self.position = 0
        self.handle: Optional[BinaryIO] = None
        self.total_bytes = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.position >= len(self.order):
            raise ConvertError(f"{name}: more tensors than planned")
        shard, (planned, shape, dtype) = self.order[self.position]
        if name != planned or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConvertError(f"wrote {name} {tuple(tensor.shape)} {tensor.dtype} where {planned} {shape} {dtype} "
                               "was planned")
        if self.handle is None:
            self._open(shard)
        self.handle.write(_bytes_of(tensor))
        self.total_bytes += tensor.numel() * tensor.element_size()
        self.position += 1
        if self.position == len(self.order) or self.order[self.position][0] != shard:
            self.handle.close()
            self.handle = None

    def _open(self, shard: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in self.shards[shard]:
            nbytes = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.handle = open(os.path.join(self.directory, self.files[shard]), "wb")
        self.handle.write(struct.pack("<Q", len(text)) + text)

    def close(self) -> List[str]:
        if self.position != len(self.order):
            raise ConvertError(f"{len(self.order) - self.position} planned tensor(s) were never written, e.g. "
                               f"{self.order[self.position][1][0]}")
        if len(self.files) > 1:
            weight_map = {name: self.files[k] for k, shard in enumerate(self.shards) for name, _, _ in shard}
            with open(os.path.join(self.directory, INDEX), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                          f, indent=2)
        return self.files


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
