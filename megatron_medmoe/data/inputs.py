"""Input files -> chunks of records for `medmoe preprocess`, one reader per format.

- JSONL (`.jsonl`, `.json-lines`, `.ndjson`, and any other extension: JSONL was once the only format):
  one record per line; a chunk is a line-aligned byte range, read by whoever parses it.
- JSON array (`.json`): one array of records, the ApolloMoE release's `ApolloMoEDataset.json`. Streamed, never
  loaded whole: this process only finds where each item begins and ends (a scan for strings and brackets
  that follows the array's own grammar and leaves each item's inside to `json.loads`), so a chunk is a byte
  range plus the items' bounds in it, and each item is parsed from its bytes exactly like a JSONL line (by
  json.loads, in the workers). Not ijson here, which `medmoe eval` uses for its small files: it hands back
  Python objects in this process only, with no byte positions, so the workers could not parse in parallel,
  errors could not say where, and the records would not be the same bytes as their JSONL lines. A
  broken array (cut short, not an array, a missing comma, data after its end) ends the run with the item and
  byte where it broke: past that point nothing can be trusted, so it cannot be skipped.
- Parquet (`.parquet`, as Hugging Face datasets export them): read in batches of rows (never the whole table),
  a chunk carrying its Arrow batch; columns are the same fields as JSON keys, and a `conversations` column of
  list<struct<from, value>> becomes the same list of {"from", "value"} objects.
`--input-format` overrides the extension for every input.
"""
from __future__ import annotations

import codecs
import os
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np

from .records import RecordError

INPUT_FORMATS = ("jsonl", "json", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".json-lines": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
# reasons that, inside a JSON array, mean its structure cannot be trusted (see JsonArrayChunk.fatal)
_ARRAY_FATAL = frozenset({"malformed_json"})


def input_format(path: str, override: Optional[str] = None) -> str:
    return override or _EXTENSIONS.get(os.path.splitext(path)[1].lower(), "jsonl")


class InputStructureError(ValueError):
    """A file whose structure is broken: the run cannot go on past it (nor skip it)."""


@dataclass(frozen=True)
class LineChunk:
    path: str
    start: int  # first byte
    end: int
    first_line: int  # 1-based number of the first line
    fatal = frozenset()

    def items(self) -> Iterator[Tuple[int, bytes]]:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(self.end - self.start)
        if self.start == 0:  # a byte-order mark alone is an empty file, not a malformed record
            data = data.removeprefix(codecs.BOM_UTF8)
        for number, raw in enumerate(data.split(b"\n"), start=self.first_line):
            if raw.strip():
                yield number, raw

    def where(self, number: int) -> str:
        return f"{self.path}:{number}"


@dataclass(frozen=True, eq=False)
class JsonArrayChunk:
    path: str
    start: int  # the first item's first byte
    end: int  # past the last item's last byte
    first_item: int  # 0-based index in the array
    bounds: np.ndarray  # (items, 2): each item's [start, end) relative to `start`
    fatal = _ARRAY_FATAL

    def items(self) -> Iterator[Tuple[int, bytes]]:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(self.end - self.start)
        for k, (a, b) in enumerate(self.bounds.tolist()):
            yield self.first_item + k, data[a:b]

    def where(self, number: int) -> str:
        return f"{self.path}: item {number}, byte {self.start + int(self.bounds[number - self.first_item, 0])}"


@dataclass(frozen=True, eq=False)
class TableChunk:
    path: str
    first_row: int  # 0-based row number in the file
    batch: object  # pyarrow.RecordBatch
    fatal = frozenset()

    def items(self) -> Iterator[Tuple[int, object]]:
        """(row number, a dict, or the RecordError of a row that could not be read)"""
        yield from enumerate(_rows(self.batch), start=self.first_row)

    def where(self, number: int) -> str:
        return f"{self.path}: row {number}"


@dataclass(frozen=True)
class BrokenInput:
    """Where a file's structure broke, delivered in input order after the chunks before it, so that an error
    in an earlier record is still the one reported."""
    path: str
    message: str


Chunk = Union[LineChunk, JsonArrayChunk, TableChunk, BrokenInput]


def chunks(files: List[str], chunk_bytes: int, override: Optional[str] = None,
           fields: Optional[frozenset] = None) -> Iterator[Chunk]:
    """Every file's chunks in order; `fields`: the record fields that are read (None: all)."""
    for path in files:
        kind = input_format(path, override)
        if kind == "jsonl":
            yield from line_chunks(path, chunk_bytes)
        elif kind == "json":
            yield from json_array_chunks(path, chunk_bytes)
        else:
            yield from table_chunks(path, chunk_bytes, fields)


# ---- JSONL

def line_chunks(path: str, chunk_bytes: int) -> Iterator[LineChunk]:
    """Line-aligned byte ranges of about `chunk_bytes` (a longer line is a range of its own)."""
    with open(path, "rb") as f:
        start, line = 0, 1
        while True:
            f.seek(start)
            block = f.read(chunk_bytes)
            if not block:
                break
            if len(block) == chunk_bytes:  # not the end of the file: stop after the last whole line
                cut = block.rfind(b"\n")
                if cut >= 0:
                    block = block[:cut + 1]
                else:  # no newline at all: read on to the end of this line
                    while True:
                        more = f.read(chunk_bytes)
                        cut = more.find(b"\n")
                        block += more if cut < 0 else more[:cut + 1]
                        if not more or cut >= 0:
                            break
            yield LineChunk(path, start, start + len(block), line)
            line += block.count(b"\n")
            start += len(block)


# ---- JSON array

_SPACE = re.compile(rb"[ \t\n\r]*")
# a whole string, its escapes included (the "unrolled" form: no nested repetition, so a string cut off by
# the end of the buffer fails in linear time instead of backtracking)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# from inside a nested value up to its next bracket outside any string (or a string the buffer cuts off)
_TO_BRACKET = re.compile(rb'[^"\[\]{}]*(?:"[^"\\]*(?:\\.[^"\\]*)*"[^"\[\]{}]*)*', re.S)
_SCALAR = re.compile(rb'[^ \t\n\r,\[\]{}"]+')
_OPEN, _QUOTE, _COMMA = frozenset(b"[{"), ord('"'), ord(",")
# an item longer than this is taken for a bracket or string left open (which would make the rest of the file
# one item, read whole), not for a record
MAX_ITEM_BYTES = 1 << 30
_FOUND = {ord("{"): "an object", ord('"'): "a string", ord("["): "an array"}


class _NeedMore(Exception):
    """The buffer ends inside what is being read."""


class _ArrayScanner:
    """Item bounds of one JSON array file, read in blocks; holds one block plus the item being read."""

    def __init__(self, path: str, block: int):
        self.path, self.block = path, block
        self.f = open(path, "rb")
        self.buf, self.base, self.eof = b"", 0, False  # buf holds file bytes [base, base + len(buf))
        self.items = 0

    def close(self) -> None:
        self.f.close()

    def fail(self, at: int, problem: str) -> InputStructureError:
        return InputStructureError(f"{self.path}: item {self.items}, byte {at}: {problem}")

    def fill(self, keep_from: int, need: int = 0) -> bool:
        """Drop what lies before file byte `keep_from`, read on; False at the end of the file."""
        if self.eof:
            return False
        self.buf = self.buf[keep_from - self.base:]
        self.base = keep_from
        more = self.f.read(max(self.block, need))
        self.eof = len(more) == 0
        self.buf += more
        return not self.eof

    def skip_space(self, at: int) -> int:
        """File position of the next byte that is not white space, reading on as needed (the end of the file:
        its size)."""
        while True:
            at = self.base + _SPACE.match(self.buf, at - self.base).end()
            if at < self.base + len(self.buf) or not self.fill(at):
                return at

    def byte(self, at: int) -> Optional[int]:
        i = at - self.base
        return self.buf[i] if i < len(self.buf) else None

    def value_end(self, at: int) -> int:
        """File position past the value starting at `at` (not white space); raises _NeedMore."""
        i, buf = at - self.base, self.buf
        c = buf[i]
        if c in _OPEN:
            depth = 0
            while True:
                depth += 1 if buf[i] in _OPEN else -1
                i += 1
                if depth == 0:
                    return self.base + i
                i = _TO_BRACKET.match(buf, i).end()
                if i >= len(buf) or buf[i] == _QUOTE:  # the buffer ends in this value or in one of its strings
                    raise _NeedMore
        if c == _QUOTE:
            match = _STRING.match(buf, i)
            if match is None:  # the buffer ends inside the string
                raise _NeedMore
        else:
            match = _SCALAR.match(buf, i)
            if match.end() == len(buf) and not self.eof:  # the next block may continue it
                raise _NeedMore
        return self.base + match.end()

    def read_value(self, at: int) -> int:
        size = 0
        while True:
            try:
                return self.value_end(at)
            except _NeedMore:
                size = 2 * max(size, len(self.buf) - (at - self.base))  # an item longer than a block: read more
                if size > 2 * MAX_ITEM_BYTES:
                    raise self.fail(at, f"item {self.items} is longer than {MAX_ITEM_BYTES >> 30} GiB: a bracket or "
                                    "string left open in it?") from None
                if not self.fill(at, size):
                    raise self.fail(self.base + len(self.buf), f"the file ends inside item {self.items} (the array "
                                    "is not closed): it is cut short, e.g. an incomplete download or copy") from None

    def bounds(self) -> Iterator[Tuple[int, int]]:
        """(start, end) file positions of every item, in order; raises InputStructureError."""
        self.fill(0)
        at = len(codecs.BOM_UTF8) if self.buf.startswith(codecs.BOM_UTF8) else 0
        at = self.skip_space(at)
        c = self.byte(at)
        if c is None:
            return  # an empty file: counted as one, like an empty JSONL file
        if c != ord("["):
            found = _FOUND.get(c) or (repr(chr(c)) if 32 <= c < 127 else f"the byte 0x{c:02x}")
            hint = (" (one record per line, JSON Lines, as Megatron-LM's loose JSON? give --input-format jsonl)"
                    if c == ord("{") else "")
            raise self.fail(at, f"expected a JSON array of records ([{{...}}, ...]), found {found}{hint}")
        at = self.skip_space(at + 1)
        if self.byte(at) == ord("]"):
            return self._after_array(at + 1)
        while True:
            c = self.byte(at)
            if c is None:
                raise self.fail(at, f"the file ends before item {self.items} (the array is not closed): it is cut "
                                "short, e.g. an incomplete download or copy")
            if c in (_COMMA, ord("]"), ord("}")):
                raise self.fail(at, f"expected item {self.items}, found {chr(c)!r}" + (
                    " (an empty item between commas, or a comma before the closing ])" if c != ord("}") else ""))
            end = self.read_value(at)
            yield at, end
            self.items += 1
            at = self.skip_space(end)
            c = self.byte(at)
            if c == _COMMA:
                at = self.skip_space(at + 1)
            elif c == ord("]"):
                return self._after_array(at + 1)
            elif c is None:
                raise self.fail(at, f"the file ends after item {self.items - 1} (the array is not closed): it is "
                                "cut short, e.g. an incomplete download or copy")
            else:
                raise self.fail(at, f"expected ',' or ']' after item {self.items - 1}, found "
                                f"{self.buf[at - self.base:at - self.base + 20]!r}")

    def _after_array(self, at: int) -> None:
        at = self.skip_space(at)
        if self.byte(at) is not None:
            raise self.fail(at, f"data after the end of the array (which holds {self.items} "
                            f"item{'' if self.items == 1 else 's'}): {self.buf[at - self.base:at - self.base + 20]!r}")


def json_array_chunks(path: str, chunk_bytes: int) -> Iterator[Chunk]:
    """Runs of whole items of about `chunk_bytes`; a broken structure comes last, as a BrokenInput."""
    scanner = _ArrayScanner(path, chunk_bytes)
    pending: List[Tuple[int, int]] = []
    first = 0

    def chunk() -> JsonArrayChunk:
        start = pending[0][0]
        return JsonArrayChunk(path, start, pending[-1][1], first,
                              np.asarray(pending, dtype=np.int64).reshape(-1, 2) - start)

    try:
        for start, end in scanner.bounds():
            pending.append((start, end))
            if end - pending[0][0] >= chunk_bytes:
                yield chunk()
                first += len(pending)
                pending = []
        if pending:
            yield chunk()
    except InputStructureError as e:
        if pending:
            yield chunk()
        yield BrokenInput(path, str(e))
    finally:
        scanner.close()


# ---- Parquet

def table_chunks(path: str, chunk_bytes: int, fields: Optional[frozenset] = None) -> Iterator[Chunk]:
    """Batches of rows of about `chunk_bytes` (by the file's own uncompressed sizes), row group by row group,
    of the columns named in `fields` (None: all)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        yield BrokenInput(path, f"{path}: not a readable Parquet file ({_one_line(e)})")
        return
    try:
        columns = None if fields is None else [name for name in table.schema_arrow.names if name in fields]
        meta = table.metadata
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        rows_per_batch = max(1, int(chunk_bytes * meta.num_rows / size)) if size else 1 << 16
        row = 0
        try:
            # one thread: the cores are the tokenizer's
            for batch in table.iter_batches(batch_size=rows_per_batch, columns=columns, use_threads=False):
                yield TableChunk(path, row, batch)
                row += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            yield BrokenInput(path, f"{path}: row {row}: cannot read the file from here on ({_one_line(e)})")
    finally:
        table.close()


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # Arrow's messages span lines; ours are one


def _rows(batch) -> list:
    """The batch's rows as dicts (nested lists and structs as lists and dicts). A string that is not UTF-8
    (written by a tool that did not check) fails the conversion; then row by row, that row alone refused."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        rows = []
        for i in range(batch.num_rows):
            try:
                rows.append(batch.slice(i, 1).to_pylist()[0])
            except UnicodeDecodeError as e:
                rows.append(RecordError("invalid_utf8", f"invalid UTF-8 in a string column ({e.reason})"))
        return rows
