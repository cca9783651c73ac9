"""`medmoe preprocess`: corpora (JSONL, JSON arrays, Parquet) -> megatron-core indexed datasets with a language
per document.

Output, all under --output-prefix:
  PREFIX.bin / PREFIX.idx              tokens, one sequence per document (megatron-core's format)
  PREFIX.loss_mask.bin / .idx          chat only: 1 where the token carries loss (answers, end-of-text)
  PREFIX.lang.npy / PREFIX.source.npy  per document: index into the summary's `languages` / `sources`
  PREFIX.class.npy                     per document: index into the summary's `classes` (null: no class given)
  PREFIX.json                          summary: counts per language, family and class, skipped records by reason
  PREFIX.png                           documents and tokens per language and per family
Nothing is under the prefix until everything is complete: the files are written aside (unnamed where the
file system allows, see data/indexed.py's ScratchFile) and put in place at the end, the old PREFIX.json
removed first and the new one last.

Input files are read in chunks of records (data/inputs.py: line ranges, runs of a JSON array's items, Parquet
row batches); each chunk is parsed, tokenized (the fast tokenizer's batched encode) and turned into arrays,
then written in input order, with a bounded number of chunks in flight, so memory does not grow with the
corpus. With one worker this happens in this process, the encode of one chunk (which runs in
Rust on every core) overlapping the parsing of the next; with more, each worker process does all of it on
one core while this process reads and writes.

Stopping: SIGINT (Ctrl-C), SIGTERM and SIGHUP discard everything written aside and end `medmoe preprocess`
with one line and exit code 128 + the signal's number (130, 143, 129: the shell's convention for a command
ended by a signal); one that arrives while the finished output is being put in place lets that finish.
Workers die with this process however it ends (a parent-death signal), SIGKILL included.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..languages import load_registry
from ..runtime.exit_codes import EXIT_CONFIG, EXIT_FAILURE, EXIT_INPUT, EXIT_OK
from ..runtime.lifeline import die_with_parent
from .chat import TEMPLATES, loss_mask_from_offsets
from .indexed import ScratchFile, StreamingArrayWriter, StreamingIndexedWriter, token_dtype
from .inputs import INPUT_FORMATS, BrokenInput, Chunk, chunks
from .records import FORMATS, RecordError, RecordParser
from .tokenizer import FastTokenizer, load_fast_tokenizer, load_tokenizer

SUMMARY_VERSION = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MAX_NAMES = int(np.iinfo(np.uint16).max) + 1  # distinct languages, sources or classes: PREFIX.*.npy are uint16


class PreprocessError(ValueError):
    """Input that stops preprocessing (with --on-error fail), or nothing usable at all."""

    exit_code = EXIT_INPUT


class PreprocessUsageError(PreprocessError):
    """Options that cannot work: nothing was read."""

    exit_code = EXIT_CONFIG


class WorkerDied(RuntimeError):
    """A worker process ended without being asked to (the out-of-memory killer, a signal of its own)."""


class PreprocessStopped(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so that no handler on the way takes it
    for an error of the input."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopSignals:
    """Installed by `medmoe preprocess`: a stop signal raises PreprocessStopped in the main thread, and is
    only noted once the run is stopping anyway (cleaning up) or putting its finished output in place."""

    def __init__(self):
        self.received: Optional[int] = None
        self._raise = False
        self._pid = None
        self._previous: dict = {}

    def install(self) -> None:
        self.received, self._raise, self._pid = None, True, os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self.received, self._raise, self._previous = None, False, {}

    def hold(self) -> None:
        """From now on a stop signal is only noted."""
        self._raise = False

    def check(self) -> None:
        """Raise for a signal that arrived while its handler's exception could not reach us (see `blocked`)."""
        if self.received is not None and self._raise:
            raise PreprocessStopped(self.received)

    @contextlib.contextmanager
    def blocked(self):
        """No stop signal is handled inside: around forking, where a handler run by fork's own hooks would
        raise into code that ignores exceptions. A signal that arrives meanwhile is handled on leaving."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _handle(self, signum, _frame) -> None:
        if os.getpid() != self._pid:  # a worker, forked before it set its own handlers: the parent decides
            return
        self.received = self.received or signum
        self.check()


_STOP = _StopSignals()


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
    class_field: str = "class"
    language_table: str = "families"
    on_error: str = "fail"
    template: str = "apollo"
    chunk_bytes: int = 2 << 20  # input read, parsed and tokenized per task (whole records)
    input_format: Optional[str] = None  # jsonl | json | parquet for every input; None: by each file's extension

    def check(self) -> None:
        if self.fmt not in FORMATS:
            raise PreprocessUsageError(f"--format must be one of {FORMATS}, got {self.fmt!r}")
        if self.input_format is not None and self.input_format not in INPUT_FORMATS:
            raise PreprocessUsageError(f"--input-format must be one of {INPUT_FORMATS}, got {self.input_format!r}")
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
    classes: List[Optional[str]] = field(default_factory=list)
    errors: List[Tuple[str, str, str]] = field(default_factory=list)  # where (file:line, file: item N), reason, message
    path: str = ""
    items: int = 0  # records read (non-blank lines, array items, rows)
    normalised: Counter = field(default_factory=Counter)  # (code as written, the table's code) -> documents
    failure: Optional[str] = None  # the input's structure broke after these records: the run ends


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
                            load_tokenizer(options.tokenizer) if options.template == "tokenizer" else None,
                            options.class_field),
    )


def _worker_main(conn, parent_pid: int) -> None:
    """A forked worker: chunks in, ChunkResults out, in order, until told to stop (None)."""
    die_with_parent(parent_pid)  # however the parent ends, SIGKILL included
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C signals the whole process group: the parent decides
    for sig in (signal.SIGTERM, signal.SIGHUP):  # but one of its own ends it at once
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # forked while the parent blocked them
    while True:
        try:
            chunk = conn.recv()
        except EOFError:  # the parent is gone
            return
        if chunk is None:
            return
        try:
            conn.send(_process_chunk(chunk))
        except Exception:
            conn.send(_WorkerError(traceback.format_exc()))


@dataclass
class _WorkerError:
    traceback: str


class _Workers:
    """Forked worker processes, each with its own pipe, chunks dealt round-robin so results come back in input
    order. Not concurrent.futures' ProcessPoolExecutor: a worker killed while sending a result leaves that
    pool's reader thread waiting forever for the rest of the message (the parent holds a write end of the
    shared result pipe too), so neither a stop nor a dead worker could end the run. Here each pipe's other
    end is in its worker alone, and a worker's death reads as end of file."""

    def __init__(self, count: int):
        context = multiprocessing.get_context("fork")
        self.conns, self.procs = [], []
        with _STOP.blocked():
            for _ in range(count):
                ours, theirs = context.Pipe()
                proc = context.Process(target=_worker_main, args=(theirs, os.getpid()), daemon=True)
                proc.start()
                theirs.close()  # before the next fork, so that no other process holds it
                self.conns.append(ours)
                self.procs.append(proc)

    def map(self, chunks, window: int) -> Iterator[ChunkResult]:
        """Results in input order, at most `window` chunks in flight (bounded memory)."""
        pending = deque()
        for k, chunk in enumerate(chunks):
            i = k % len(self.conns)
            try:
                self.conns[i].send(chunk)
            except (EOFError, OSError):
                raise self._died(i) from None
            pending.append(i)
            if len(pending) >= window:
                yield self._receive(pending.popleft())
        while pending:
            yield self._receive(pending.popleft())

    def _receive(self, i: int) -> ChunkResult:
        try:
            result = self.conns[i].recv()
        except (EOFError, OSError):
            raise self._died(i) from None
        if isinstance(result, _WorkerError):
            raise RuntimeError(f"a worker process failed:\n{result.traceback}")
        return result

    def _died(self, i: int) -> WorkerDied:
        self.procs[i].join(5)
        code = self.procs[i].exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return WorkerDied(f"a worker process died ({how})")

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:  # that worker is gone already
                pass
        self.join()

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()
        self.join()

    def join(self) -> None:
        for proc in self.procs:
            proc.join()
        for conn in self.conns:
            conn.close()


@dataclass
class _Parsed:
    records: list
    errors: List[Tuple[str, str, str]]
    items: int  # records read
    path: str
    failure: Optional[str] = None


def _parse(chunk: Chunk) -> _Parsed:
    parsed = _Parsed([], [], 0, chunk.path)
    if isinstance(chunk, BrokenInput):
        parsed.failure = chunk.message
        return parsed
    parser: RecordParser = _STATE["parser"]
    for number, item in chunk.items():
        parsed.items += 1
        try:
            if isinstance(item, RecordError):  # a row the reader could not decode
                raise item
            parsed.records.append(parser.parse(item, chunk.path) if isinstance(item, bytes)
                                  else parser.parse_object(item, chunk.path))
        except RecordError as e:
            if e.reason in chunk.fatal:  # e.g. a JSON array's item that is not JSON: its bounds are doubtful
                parsed.failure = (f"{chunk.where(number)}: {e}; the array's structure is broken here, so it cannot "
                                  "be read on (nor this item skipped)")
                break
            parsed.errors.append((chunk.where(number), e.reason, str(e)))
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
                         path=parsed.path, items=parsed.items, failure=parsed.failure)
    if not encodings:
        return result
    ids = [e.ids for e in encodings]
    if parsed.records[0].loss_spans is None:  # raw text: every document ends with end-of-text
        eod = _STATE["eod"]
        for doc in ids:
            doc.append(eod)
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum(dtype=np.int64)))
    result.tokens, result.lengths = flat, lengths
    if parsed.records[0].loss_spans is not None:
        result.loss_mask = np.fromiter(
            itertools.chain.from_iterable(loss_mask_from_offsets(e.offsets, r.loss_spans)
                                          for r, e in zip(parsed.records, encodings)),
            dtype=np.uint8, count=flat.size)
    result.langs = [r.lang for r in parsed.records]
    result.sources = [r.source for r in parsed.records]
    result.classes = [r.record_class for r in parsed.records]
    result.normalised.update((r.lang_given, r.lang) for r in parsed.records if r.lang_given is not None)
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
        for path in matched:
            if os.path.isdir(path):
                raise PreprocessError(f"--input {pattern!r}: {path} is a directory; give the files in it, e.g. "
                                      f"--input '{os.path.join(path, '*.jsonl')}'")
        files += matched
    return files


class _Names:
    """Distinct names (languages, sources, classes) in order of first appearance, as uint16 indices."""

    def __init__(self, what: str, key: str):
        self.what, self.key, self.index = what, key, {}

    def indices(self, names) -> List[int]:
        out = [self.index.setdefault(name, len(self.index)) for name in names]
        if len(self.index) > MAX_NAMES:
            raise PreprocessError(f"more than {MAX_NAMES:,} distinct {self.what} (PREFIX.{self.key}.npy holds uint16 "
                                  f"indices): does --{self.key}-field name a field that differs per record?")
        return out

    def names(self) -> list:
        return list(self.index)


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
    scratch: list = []  # everything written aside, discarded unless all of it is put in place
    languages, sources, classes = _Names("languages", "lang"), _Names("sources", "source"), _Names("classes", "class")
    per_lang_docs, per_lang_tokens, skipped, normalised = Counter(), Counter(), Counter(), Counter()
    per_class_docs, per_class_tokens = Counter(), Counter()
    examples: Dict[str, str] = {}
    meter = _Progress(progress)
    workers = None
    try:
        writers = {"tokens": StreamingIndexedWriter(prefix, token_dtype(vocab_size))}
        scratch.append(writers["tokens"])
        for key in ("lang", "source", "class"):
            path = f"{prefix}.{key}.npy"
            writers[key] = StreamingArrayWriter(path, np.uint16)
            scratch.append(writers[key])
        if options.fmt == "chat":
            writers["loss_mask"] = StreamingIndexedWriter(prefix + ".loss_mask", np.uint8)
            scratch.append(writers["loss_mask"])
        _init_stages(options, tokenizer, parallel_tokenizer=options.workers == 1)
        inputs = chunks(files, options.chunk_bytes, options.input_format, _STATE["parser"].fields)
        if options.workers > 1:
            # forked workers inherit the loaded tokenizer and parser (the tokenizer's thread pool has not
            # run in this process yet, so forking is safe). They are forked by this (the main) thread, whose
            # end is what the parent-death signal watches.
            workers = _Workers(options.workers)
            results = workers.map(inputs, window=4 * options.workers)
        else:
            results = _pipelined(inputs)
        # matplotlib takes most of a second to import: import it while the tokenizer runs rather than at the
        # end (and after forking: a child forked mid-import would find the import lock held)
        charting = threading.Thread(target=_import_chart_backend, name="medmoe-chart-import", daemon=True)
        charting.start()
        items_per_file = Counter()
        for result in results:
            _STOP.check()
            items_per_file[result.path] += result.items
            for where, reason, message in result.errors:
                if options.on_error == "fail":
                    raise PreprocessError(f"{where}: {message}")
                skipped[reason] += 1
                examples.setdefault(reason, f"{where}: {message}")
            if result.lengths.size:
                writers["tokens"].add_documents(result.tokens, result.lengths)
                if "loss_mask" in writers:
                    writers["loss_mask"].add_documents(result.loss_mask, result.lengths)
                writers["lang"].add(languages.indices(result.langs))
                writers["source"].add(sources.indices(result.sources))
                writers["class"].add(classes.indices(result.classes))
                for code, name, n in zip(result.langs, result.classes, result.lengths.tolist()):
                    per_lang_docs[code] += 1
                    per_lang_tokens[code] += n
                    per_class_docs[name] += 1
                    per_class_tokens[name] += n
                normalised.update(result.normalised)
            if result.failure is not None:  # after this chunk's records, which may hold an earlier error
                raise PreprocessError(result.failure)
            meter.update(writers["tokens"].documents, writers["tokens"].tokens)
        for path in (f for f in files if items_per_file[f] == 0):
            if options.on_error == "fail":
                raise PreprocessError(f"{path}: the input file is empty (no records)")
            skipped["empty_file"] += 1
            examples.setdefault("empty_file", f"{path}: empty")
        if writers["tokens"].documents == 0:
            raise PreprocessError("no documents were produced" + (f" (skipped: {dict(skipped)})" if skipped else ""))
        meter.update(writers["tokens"].documents, writers["tokens"].tokens, final=True)
        for writer in writers.values():
            writer.finish()
        summary = _summary(options, files, vocab_size, tokenizer.end_of_text_id, registry, languages.names(),
                           sources.names(), classes.names(), per_lang_docs, per_lang_tokens, per_class_docs,
                           per_class_tokens, skipped, examples, normalised, writers["tokens"].documents,
                           writers["tokens"].tokens, time.perf_counter() - meter.start)
        charting.join()
        from .summary import write_chart

        chart, report = ScratchFile(prefix + ".png"), ScratchFile(prefix + ".json")
        scratch += [chart, report]
        write_chart(summary, chart.file)
        # backslashreplace: a file name that is not UTF-8 keeps its escapes instead of failing the run here
        report.file.write(json.dumps(summary, indent=1, ensure_ascii=False).encode("utf-8", "backslashreplace"))
        _STOP.check()
        _STOP.hold()  # complete: a signal from now on lets the output be put in place
        _put_in_place(prefix, [*writers.values(), chart, report])
        if workers is not None:
            workers.close()
        return summary
    except BaseException:
        _STOP.hold()  # stopping anyway: a second signal must not cut the cleanup short
        for item in scratch:
            item.discard()
        if workers is not None:  # no need to let them finish their chunks
            workers.kill()
        raise


def _import_chart_backend() -> None:
    try:
        from .summary import import_backend

        import_backend()
    except Exception:  # write_chart imports it again and says what is wrong
        pass


def _put_in_place(prefix: str, items: list) -> None:
    """Publish the output, PREFIX.json (what makes a dataset complete) last."""
    names = [prefix + ext for ext in (".json", ".bin", ".idx", ".loss_mask.bin", ".loss_mask.idx", ".lang.npy",
                                      ".source.npy", ".class.npy", ".png")]
    try:
        if os.path.lexists(prefix + ".json"):  # an older dataset here is incomplete from now on
            os.remove(prefix + ".json")
        for item in items:
            item.commit()
    except BaseException:
        for name in names:  # half of the new dataset beside half of an old one: neither is usable
            if os.path.lexists(name):
                os.remove(name)
        raise


def _summary(options, files, vocab_size, eod, registry, languages, sources, classes, docs, tokens, class_docs,
             class_tokens, skipped, examples, normalised, n_docs, n_tokens, seconds) -> dict:
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
        "classes": classes,  # null: the documents whose record has no class field
        "per_class": {name: {"documents": class_docs[name], "tokens": class_tokens[name]}
                      for name in classes if name is not None},
        "unclassified": {"documents": class_docs[None], "tokens": class_tokens[None]},
        "skipped": dict(skipped),
        "skipped_examples": examples,
        # language codes written otherwise than the table writes them: as written -> table code, documents
        "normalised_languages": {given: {"code": code, "documents": n}
                                 for (given, code), n in sorted(normalised.items())},
    }


def preprocess_command(options: PreprocessOptions, quiet: bool = False) -> int:
    """`medmoe preprocess`: exit 0 with a table, 2 for bad options, 3 for bad input, 128 + N when stopped by
    signal N, 1 when a worker process died."""
    from ..languages import LanguageTableError
    from .summary import summary_table
    from .tokenizer import TokenizerError

    nothing = f"nothing was written under {options.output_prefix}"
    _STOP.install()
    try:
        summary = run_preprocess(options, progress=not quiet)
        late = _STOP.received
    except (LanguageTableError, TokenizerError) as e:
        print(f"medmoe preprocess: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except PreprocessError as e:
        print(f"medmoe preprocess: {e}", file=sys.stderr)
        return e.exit_code
    except (PreprocessStopped, WorkerDied) as e:
        signum = e.signum if isinstance(e, PreprocessStopped) else _STOP.received
        if signum is None:  # not our signal: a worker was killed alone (the out-of-memory killer, say)
            print(f"medmoe preprocess: {e}; {nothing}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"medmoe preprocess: stopped by {signal.Signals(signum).name}; {nothing}", file=sys.stderr)
        return 128 + signum
    finally:
        _STOP.uninstall()
    if late is not None:
        print(f"medmoe preprocess: {signal.Signals(late).name} arrived while the finished output was being put in "
              "place; it is complete", file=sys.stderr)
    if not quiet:
        print(summary_table(summary))
        print(f"wrote {options.output_prefix}.{{bin,idx,json,png}} in {summary['seconds']:.1f} s")
    return EXIT_OK
