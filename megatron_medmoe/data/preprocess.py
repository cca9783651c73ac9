"""`medmoe preprocess`: JSONL corpora -> megatron-core indexed datasets with a language per document.

Output, all under --output-prefix (written aside and renamed when complete; PREFIX.json last):
  PREFIX.bin / PREFIX.idx              tokens, one sequence per document (megatron-core's format)
  PREFIX.loss_mask.bin / .idx          chat only: 1 where the token carries loss (answers, end-of-text)
  PREFIX.lang.npy / PREFIX.source.npy  per document: index into the summary's `languages` / `sources`
  PREFIX.json                          summary: counts per language and family, skipped records by reason
  PREFIX.png                           documents and tokens per language and per family

Lines are read in chunks; each chunk is parsed, tokenized (the fast tokenizer's batched encode) and turned
into arrays, then written in input order, with a bounded number of chunks in flight, so memory does not
grow with the corpus. With one worker this happens in this process, the encode of one chunk (which runs in
Rust on every core) overlapping the parsing of the next; with more, each worker process does all of it on
one core while this process reads and writes.
"""
from __future__ import annotations

import glob
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..languages import load_registry
from .chat import TEMPLATES, loss_mask_from_offsets
from .indexed import StreamingArrayWriter, StreamingIndexedWriter, token_dtype
from .records import FORMATS, RecordError, RecordParser
from .tokenizer import FastTokenizer, load_fast_tokenizer, load_tokenizer

SUMMARY_VERSION = 1


class PreprocessError(ValueError):
    """Input that stops preprocessing (with --on-error fail), or nothing usable at all."""

    exit_code = 3


class PreprocessUsageError(PreprocessError):
    """Options that cannot work: nothing was read."""

    exit_code = 2


@dataclass
class PreprocessOptions:
    inputs: List[str]
    tokenizer: str
    output_prefix: str
    fmt: str = "text"
    workers: int = 1
    lang: Optional[str] = None
    lang_field: str = "lang"
    source_field: str = "source"
    text_field: str = "text"
    language_table: str = "families"
    on_error: str = "fail"
    template: str = "apollo"
    chunk_bytes: int = 2 << 20  # input read, parsed and tokenized per task (line-aligned)

    def check(self) -> None:
        if self.fmt not in FORMATS:
            raise PreprocessUsageError(f"--format must be one of {FORMATS}, got {self.fmt!r}")
        if self.on_error not in ("fail", "skip"):
            raise PreprocessUsageError(f"--on-error must be fail or skip, got {self.on_error!r}")
        if self.template not in TEMPLATES:
            raise PreprocessUsageError(f"--chat-template must be one of {TEMPLATES}, got {self.template!r}")
        if self.workers < 1:
            raise PreprocessUsageError(f"--workers must be at least 1, got {self.workers}")


@dataclass
class ChunkResult:
    tokens: np.ndarray
    lengths: np.ndarray
    loss_mask: Optional[np.ndarray]
    langs: List[str] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)
    errors: List[Tuple[str, int, str, str]] = field(default_factory=list)  # path, line, reason, message
    path: str = ""
    lines: int = 0  # non-blank lines read


# ---- the three stages of a chunk: parse (Python), encode (Rust, releases the GIL), finish (arrays)

_STATE: Dict[str, object] = {}


def _init_stages(options: PreprocessOptions, tokenizer: FastTokenizer, parallel_tokenizer: bool) -> None:
    """Set up this process for the stages (forked workers inherit it)."""
    if not parallel_tokenizer:  # several workers: one thread each instead of each using every core
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE.update(
        backend=tokenizer.backend,
        eod=tokenizer.end_of_text_id,
        parser=RecordParser(options.fmt, load_registry(options.language_table), options.lang, options.lang_field,
                            options.source_field, options.text_field, options.template,
                            load_tokenizer(options.tokenizer) if options.template == "tokenizer" else None),
    )


@dataclass
class _Parsed:
    records: list
    errors: List[Tuple[str, int, str, str]]
    lines: int  # non-blank lines read
    path: str


Chunk = Tuple[str, int, int, int]  # file, first byte, end byte, number of the first line


def _parse(chunk: Chunk) -> _Parsed:
    path, start, end, first_line = chunk
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    parser: RecordParser = _STATE["parser"]
    parsed = _Parsed([], [], 0, path)
    for number, raw in enumerate(data.split(b"\n"), start=first_line):
        if not raw.strip():
            continue
        parsed.lines += 1
        try:
            parsed.records.append(parser.parse(raw, path))
        except RecordError as e:
            parsed.errors.append((path, number, e.reason, str(e)))
    return parsed


def _encode(parsed: _Parsed):
    texts = [r.text for r in parsed.records]
    if not texts:
        return []
    if _STATE["parser"].fmt == "chat":  # offsets are needed for the loss mask
        return _STATE["backend"].encode_batch(texts, add_special_tokens=False)
    return _STATE["backend"].encode_batch_fast(texts, add_special_tokens=False)


def _finish(parsed: _Parsed, encodings) -> ChunkResult:
    result = ChunkResult(np.empty(0, np.int32), np.empty(0, np.int32), None, errors=parsed.errors,
                         path=parsed.path, lines=parsed.lines)
    if not encodings:
        return result
    ids = [e.ids for e in encodings]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    if parsed.records[0].loss_spans is None:  # raw text: every document ends with end-of-text
        ends = np.cumsum(lengths + 1) - 1
        tokens = np.empty(flat.size + len(ids), dtype=np.int32)
        tokens[ends] = _STATE["eod"]
        tokens[np.arange(flat.size) + np.repeat(np.arange(len(ids)), lengths)] = flat
        result.tokens, result.lengths = tokens, (lengths + 1).astype(np.int32)
    else:
        result.tokens, result.lengths = flat, lengths.astype(np.int32)
        result.loss_mask = np.fromiter(
            itertools.chain.from_iterable(loss_mask_from_offsets(e.offsets, r.loss_spans)
                                          for r, e in zip(parsed.records, encodings)),
            dtype=np.uint8, count=flat.size)
    result.langs = [r.lang for r in parsed.records]
    result.sources = [r.source for r in parsed.records]
    return result


def _process_chunk(chunk: Chunk) -> ChunkResult:
    """All three stages, in a worker process."""
    parsed = _parse(chunk)
    return _finish(parsed, _encode(parsed))


def _pipelined(chunks) -> Iterator[ChunkResult]:
    """In this process: the next chunk is parsed and the previous one finished while one is encoded."""
    with ThreadPoolExecutor(1) as encoder:
        pending = deque()
        for chunk in chunks:
            parsed = _parse(chunk)
            pending.append((parsed, encoder.submit(_encode, parsed)))
            if len(pending) > 1:
                done, future = pending.popleft()
                yield _finish(done, future.result())
        while pending:
            done, future = pending.popleft()
            yield _finish(done, future.result())


# ---- main process

def expand_inputs(patterns: List[str]) -> List[str]:
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise PreprocessUsageError(f"--input {pattern!r} matches no file")
        files += matched
    return files


def _chunks(files: List[str], chunk_bytes: int) -> Iterator[Chunk]:
    """Line-aligned byte ranges of about `chunk_bytes` (a longer line is a range of its own)."""
    for path in files:
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
                yield path, start, start + len(block), line
                line += block.count(b"\n")
                start += len(block)


def _ordered(fn, items, pool, window: int):
    """fn over items in order in the pool's processes, at most `window` items in flight (bounded memory)."""
    pending = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled, self.start, self.last = enabled, time.perf_counter(), 0.0
        self.tty = enabled and sys.stderr.isatty()

    def update(self, docs: int, tokens: int, final: bool = False):
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < (0.5 if self.tty else 10.0)):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        line = (f"{docs:,} documents, {tokens:,} tokens | {docs / elapsed:,.0f} documents/s, "
                f"{tokens / elapsed:,.0f} tokens/s")
        print(("\r" if self.tty else "") + line + ("\n" if final or not self.tty else ""), end="", file=sys.stderr,
              flush=True)


def run_preprocess(options: PreprocessOptions, progress: bool = True) -> dict:
    options.check()
    files = expand_inputs(options.inputs)
    registry = load_registry(options.language_table)
    if options.lang is not None:
        registry.language(options.lang)  # an unknown --lang fails before any work
    tokenizer = load_fast_tokenizer(options.tokenizer)
    vocab_size = tokenizer.vocab_size
    prefix = options.output_prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    writers = {"tokens": StreamingIndexedWriter(prefix, token_dtype(vocab_size)),
               "lang": StreamingArrayWriter(prefix + ".lang.npy", np.uint16),
               "source": StreamingArrayWriter(prefix + ".source.npy", np.uint16)}
    if options.fmt == "chat":
        writers["loss_mask"] = StreamingIndexedWriter(prefix + ".loss_mask", np.uint8)
    languages: Dict[str, int] = {}
    sources: Dict[str, int] = {}
    per_lang_docs, per_lang_tokens, skipped = Counter(), Counter(), Counter()
    examples: Dict[str, str] = {}
    meter = _Progress(progress)
    pool = None
    try:
        chunks = _chunks(files, options.chunk_bytes)
        if options.workers > 1:
            # forked workers inherit the loaded tokenizer and parser (the tokenizer's thread pool has not
            # run in this process yet, so forking is safe); a worker that dies breaks the pool loudly
            _init_stages(options, tokenizer, parallel_tokenizer=False)
            pool = ProcessPoolExecutor(options.workers, mp_context=multiprocessing.get_context("fork"))
            results = _ordered(_process_chunk, chunks, pool, window=4 * options.workers)
        else:
            _init_stages(options, tokenizer, parallel_tokenizer=True)
            results = _pipelined(chunks)
        lines_per_file = Counter()
        for result in results:
            lines_per_file[result.path] += result.lines
            for path, line, reason, message in result.errors:
                if options.on_error == "fail":
                    raise PreprocessError(f"{path}:{line}: {message}")
                skipped[reason] += 1
                examples.setdefault(reason, f"{path}:{line}: {message}")
            if result.lengths.size == 0:
                continue
            writers["tokens"].add_documents(result.tokens, result.lengths)
            if "loss_mask" in writers:
                writers["loss_mask"].add_documents(result.loss_mask, result.lengths)
            writers["lang"].add([languages.setdefault(code, len(languages)) for code in result.langs])
            writers["source"].add([sources.setdefault(name, len(sources)) for name in result.sources])
            for code, n in zip(result.langs, result.lengths.tolist()):
                per_lang_docs[code] += 1
                per_lang_tokens[code] += n
            meter.update(writers["tokens"].documents, writers["tokens"].tokens)
        for path in (f for f in files if lines_per_file[f] == 0):
            if options.on_error == "fail":
                raise PreprocessError(f"{path}: the input file is empty (no records)")
            skipped["empty_file"] += 1
            examples.setdefault("empty_file", f"{path}: empty")
        if writers["tokens"].documents == 0:
            raise PreprocessError("no documents were produced" + (f" (skipped: {dict(skipped)})" if skipped else ""))
        meter.update(writers["tokens"].documents, writers["tokens"].tokens, final=True)
        for writer in writers.values():
            writer.finish()
        summary = _summary(options, files, vocab_size, tokenizer.end_of_text_id, registry, list(languages),
                           list(sources), per_lang_docs, per_lang_tokens, skipped, examples,
                           writers["tokens"].documents, writers["tokens"].tokens, time.perf_counter() - meter.start)
        for writer in writers.values():
            writer.commit()
        from .summary import write_chart

        write_chart(summary, prefix + ".png")
        tmp = prefix + ".json.partial"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, ensure_ascii=False)
        os.replace(tmp, prefix + ".json")
        return summary
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _summary(options, files, vocab_size, eod, registry, languages, sources, docs, tokens, skipped, examples,
             n_docs, n_tokens, seconds) -> dict:
    per_family_docs, per_family_tokens = Counter(), Counter()
    for code in languages:
        family = registry.language(code).family
        per_family_docs[family] += docs[code]
        per_family_tokens[family] += tokens[code]
    return {
        "version": SUMMARY_VERSION,
        "format": options.fmt,
        "template": options.template if options.fmt == "chat" else None,
        "tokenizer": os.path.abspath(options.tokenizer),
        "vocab_size": vocab_size,
        "end_of_text_id": eod,
        "inputs": [os.path.abspath(f) for f in files],
        "options": {k: v for k, v in asdict(options).items() if k not in ("inputs", "tokenizer", "output_prefix")},
        "documents": n_docs,
        "tokens": n_tokens,
        "seconds": round(seconds, 3),
        "languages": languages,
        "sources": sources,
        "per_language": {code: {"name": registry.language(code).name, "family": registry.language(code).family,
                                "documents": docs[code], "tokens": tokens[code]} for code in languages},
        "per_family": {fam: {"documents": per_family_docs[fam], "tokens": per_family_tokens[fam]}
                       for fam in sorted(per_family_docs, key=lambda f: -per_family_tokens[f])},
        "skipped": dict(skipped),
        "skipped_examples": examples,
    }


def preprocess_command(options: PreprocessOptions, quiet: bool = False) -> int:
    """`medmoe preprocess`: exit 0 with a table, 2 for bad options, 3 for bad input."""
    from ..languages import LanguageTableError
    from .summary import summary_table
    from .tokenizer import TokenizerError

    try:
        summary = run_preprocess(options, progress=not quiet)
    except (LanguageTableError, TokenizerError) as e:
        print(f"medmoe preprocess: {e}", file=sys.stderr)
        return 2
    except PreprocessError as e:
        print(f"medmoe preprocess: {e}", file=sys.stderr)
        return e.exit_code
    if not quiet:
        print(summary_table(summary))
        print(f"wrote {options.output_prefix}.{{bin,idx,json,png}} in {summary['seconds']:.1f} s")
    return 0
