"""Multiple-choice question files: JSONL (one question a line) or a JSON array (the released ApolloMoEBench.json).

A `.json` file is one JSON array of question objects, streamed item by item; any other file is JSONL, one object a
line (blank lines are skipped). Both hold the same objects:
`{"question": "...", "options": ..., "answer": "B" or "(B)", "context": "...", "source": "medqa-usmle",
  "class": "major", "lang": "en", "id": "..."}`. The options are an object `{"A": "...", "B": "..."}`, a list of texts
(lettered A, B, C, ...) or, as released, one string of lettered lines `"(A) ...\\n(B) ..."`. `context` (PubMedQA-style
items), `source`, `class`, `lang` and `id` are optional. The source defaults to the file's name without extension.
The language, when not given, is the release's for its sources (`mmlu-medical-ar` -> ar), else the source name's
second `_` field (`medExam_sw` -> sw), else the 2-3 letters after its last `-` (`mmlu-medical-sw` -> sw), and must
be in the language table. The id defaults to `{source}:{line}` (JSONL) or `{source}:{item}` (array, items counted
from 0). Anything else is an error naming the file and the line or item: no question is dropped.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple

from ..data.records import source_language
from ..languages import LanguageRegistry, LanguageTableError, load_registry
from .apollomoe.tables import minor_language_codes, source_table

OPTION_LETTERS = "ABCDEF"
MIN_OPTIONS, MAX_OPTIONS = 2, len(OPTION_LETTERS)
TIERS = ("major", "minor")
_ANSWER = re.compile(r"\(([A-Z])\)|([A-Z])")
_OPTION_LINE = re.compile(r"[ \t]*\(([A-Z])\)[ \t]?")


class QuestionFileError(ValueError):
    """A question file that cannot be read; the message names the file, the line or item, and what is wrong."""


@dataclass(frozen=True)
class Question:
    qid: str
    source: str
    lang: str
    question: str  # stripped
    options: Tuple[Tuple[str, str], ...]  # (letter, text) in order, texts stripped
    answer: str  # the letter
    context: Optional[str] = None  # PubMedQA-style items: the abstract the question is about
    tier: Optional[str] = None  # the release's "class": major | minor
    # The fields the release's templates fill in, as the release formats them: the texts as the file has them
    # (options as one "(A) ...\n(B) ..." string, answer as "(B)"), rendered in that shape for the other forms.
    release_fields: Tuple[Tuple[str, str], ...] = ()
    record_digest: str = ""  # of the whole record: the release tells two questions apart by all their fields
    origin: str = ""  # where it was read: "FILE:LINE" or "FILE: item N"

    @property
    def letters(self) -> str:
        return "".join(letter for letter, _ in self.options)


def read_questions(paths: Sequence[str], language_table: str = "families") -> List[Question]:
    """Every question of the files, in file and line (item) order; the first problem raises QuestionFileError."""
    registry = load_registry(language_table)
    questions: List[Question] = []
    seen: Dict[str, str] = {}  # qid -> where it was first read
    for path in paths:
        if not os.path.isfile(path):
            raise QuestionFileError(f"{path}: no such question file")
        default_source = os.path.splitext(os.path.basename(path))[0]
        count = 0
        for where, default_id, record in read_records(path):
            question = parse_question(record, where, default_source, default_id, registry)
            if question.qid in seen:
                raise QuestionFileError(f"{where}: id {question.qid!r} was already used at {seen[question.qid]}; "
                                        'give every question its own "id"')
            seen[question.qid] = where
            questions.append(question)
            count += 1
        if count == 0:
            shape = ("an empty array" if is_json_array_file(path)
                     else "the file is empty; expected one JSON object a line")
            raise QuestionFileError(f"{path}: no questions ({shape})")
    return questions


def is_json_array_file(path: str) -> bool:
    return path.lower().endswith(".json")


def read_records(path: str) -> Iterator[Tuple[str, Callable[[str], str], object]]:
    """(where, default id from the source, parsed JSON value) for every record of a file, JSONL or JSON array."""
    if is_json_array_file(path):
        yield from read_json_array(path)
    else:
        yield from _jsonl_records(path)


def _jsonl_records(path: str):
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise QuestionFileError(f"{where}: invalid UTF-8 at byte {e.start}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuestionFileError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
            yield where, (lambda source, n=number: f"{source}:{n}"), record


def read_json_array(path: str) -> Iterator[Tuple[str, Callable[[str], str], object]]:
    """The items of a JSON array, streamed (ijson): a benchmark file is read item by item, never whole."""
    import ijson

    with open(path, "rb") as f:
        start = f.read(len(codecs.BOM_UTF8))
        if start != codecs.BOM_UTF8:
            f.seek(0)
        first = _first_char(f)
        if first is None:
            raise QuestionFileError(f"{path}: no questions (the file is empty); expected a JSON array of question "
                                    "objects, like the released ApolloMoEBench.json")
        if first != "[":
            got = {"{": "a JSON object"}.get(first, f"text starting with {first!r}")
            raise QuestionFileError(f"{path}: expected a JSON array of question objects ([{{...}}, ...]), like the "
                                    f"released ApolloMoEBench.json, got {got}; for one object a line name the file "
                                    ".jsonl")
        index = 0
        try:
            for record in ijson.items(f, "item", use_float=True):
                yield f"{path}: item {index}", (lambda source, i=index: f"{source}:{i}"), record
                index += 1
        except ijson.JSONError as e:
            reason = _first_line(e.args[0] if e.args else "") or type(e).__name__
            raise QuestionFileError(f"{path}: item {index}: invalid JSON ({reason}); {index} item(s) before it "
                                    "were read") from None


def _first_line(message) -> str:
    """The first line of ijson's message (bytes from its C backend, with the text around the error after it)."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    lines = str(message).strip().splitlines()
    return lines[0].strip() if lines else ""


def _first_char(f) -> Optional[str]:
    position = f.tell()
    while True:
        byte = f.read(1)
        if not byte:
            return None
        if not byte.isspace():
            f.seek(position)
            return byte.decode("latin-1")
        position += 1


def parse_question(record, where: str, default_source: str, default_id: Callable[[str], str],
                   registry: LanguageRegistry) -> Question:
    """One question object -> Question; a problem raises QuestionFileError prefixed with `where`."""
    def fail(message: str) -> NoReturn:
        raise QuestionFileError(f"{where}: {message}")

    if not isinstance(record, dict):
        fail(f"expected a JSON object, got {_json_type(record)}")

    text = record.get("question")
    if not isinstance(text, str) or not text.strip():
        fail('missing or empty "question" (a non-empty string)')

    raw_options = record.get("options")
    options = _options(raw_options, fail)
    letters = [letter for letter, _ in options]
    answer = parse_answer(record.get("answer"), letters, fail)

    context = record.get("context")
    if context is not None and not isinstance(context, str):
        fail(f'"context" must be a string, got {_json_type(context)}')
    tier = record.get("class")
    if tier is not None and tier not in TIERS:
        fail(f'"class" must be "major" or "minor", got {tier!r}')

    source = record.get("source", default_source)
    if not isinstance(source, str) or not source:
        fail(f'"source" must be a non-empty string, got {source!r}')
    lang = language_of(record.get("lang"), source, registry, fail)

    qid = record.get("id")
    if qid is None:
        qid = default_id(source)
    elif isinstance(qid, (str, int)) and not isinstance(qid, bool) and str(qid):
        qid = str(qid)
    else:
        fail(f'"id" must be a non-empty string or an integer, got {qid!r}')

    released_options = raw_options if isinstance(raw_options, str) else "\n".join(
        f"({letter}) {option}" for letter, option in options)
    fields = {"question": text, "options": released_options, "answer": f"({answer})"}
    if context is not None:
        fields["context"] = context
    digest = hashlib.blake2b(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"),
                             digest_size=16).hexdigest()
    return Question(qid=qid, source=source, lang=lang, question=text.strip(), options=options, answer=answer,
                    context=context, tier=tier, release_fields=tuple(fields.items()), record_digest=digest,
                    origin=where)


def parse_answer(raw, letters: Sequence[str], fail: Callable[[str], NoReturn]) -> str:
    """`B` or `(B)` -> "B", which must be one of `letters`."""
    match = _ANSWER.fullmatch(raw.strip()) if isinstance(raw, str) else None
    letter = match and (match.group(1) or match.group(2))
    if letter not in letters:
        fail(f'"answer" must be one of the option letters {", ".join(letters)} (written "B" or "(B)"), got {raw!r}')
    return letter


def _options(raw, fail: Callable[[str], NoReturn]) -> Tuple[Tuple[str, str], ...]:
    if isinstance(raw, str):
        return options_from_text(raw, fail)
    if isinstance(raw, list):
        if len(raw) > MAX_OPTIONS:
            fail(f'{len(raw)} options; at most {MAX_OPTIONS} (letters {OPTION_LETTERS}) are supported')
        pairs = list(zip(OPTION_LETTERS, raw))
    elif isinstance(raw, dict):
        pairs = list(raw.items())
        expected = list(OPTION_LETTERS[:len(pairs)])
        if len(pairs) <= MAX_OPTIONS and [letter for letter, _ in pairs] != expected:
            fail(f'option letters must be {", ".join(expected)} in that order, got {", ".join(map(str, raw))}')
    else:
        fail('missing "options": an object {"A": "...", "B": "..."}, a list of option texts, or one string of '
             'lettered lines "(A) ...\\n(B) ..." as released')
    _check_count(len(pairs), fail)
    for letter, option in pairs:
        if not isinstance(option, str) or not option.strip():
            fail(f"option {letter} must be a non-empty string, got {option!r}")
    return tuple((letter, option.strip()) for letter, option in pairs)


def options_from_text(text: str, fail: Callable[[str], NoReturn]) -> Tuple[Tuple[str, str], ...]:
    """The released options string: one `(A) text` line per option; a line without a label continues the option
    before it (an option text with a line break). Texts are kept as released, empty ones included."""
    pairs: List[List[str]] = []
    for line in text.split("\n"):
        match = _OPTION_LINE.match(line)
        if match:
            pairs.append([match.group(1), line[match.end():]])
        elif pairs:
            pairs[-1][1] += "\n" + line
        elif line.strip():
            fail(f'"options" must be lettered lines "(A) ...\\n(B) ...", but it starts with {line[:40]!r}')
    letters = [letter for letter, _ in pairs]
    if letters != list(OPTION_LETTERS[:len(letters)]) or len(letters) > MAX_OPTIONS:
        fail(f'"options" must be lettered A, B, C, ... in order (at most {MAX_OPTIONS}), got '
             f'{", ".join(f"({x})" for x in letters) or "no lettered line"}')
    _check_count(len(pairs), fail)
    return tuple((letter, option.strip()) for letter, option in pairs)


def _check_count(count: int, fail: Callable[[str], NoReturn]) -> None:
    if count < MIN_OPTIONS:
        fail(f"{count} option(s); a question needs at least {MIN_OPTIONS}")
    if count > MAX_OPTIONS:
        fail(f'{count} options; at most {MAX_OPTIONS} (letters {OPTION_LETTERS}) are supported')


def language_of(code: Optional[object], source: str, registry: LanguageRegistry,
                fail: Callable[[str], NoReturn]) -> str:
    """The table code of an explicit `lang`, else of the first language the source name gives (see the module)."""
    if code is not None:
        if not isinstance(code, str):
            fail(f'"lang" must be a language code string, got {code!r}')
        candidates = [code]
    else:
        candidates = [c for c in (source_table().language_of.get(source), source_language(source)) if c]
        candidates += minor_language_codes(source)
        if not candidates:
            fail(f'no "lang" field and the source name {source!r} has no language part (like medExam_sw or '
                 "mmlu-medical-sw) and is none of the release's sources")
    first_error: Optional[LanguageTableError] = None
    for candidate in candidates:
        try:
            return registry.language(candidate).code  # the table's code: EN and en are one language in the scores
        except LanguageTableError as e:
            first_error = first_error or e
    fail(str(first_error))


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")
