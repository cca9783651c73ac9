"""One record (a JSONL line, a JSON array's item, a Parquet row) -> the text to tokenize, its loss spans,
language, source and class; or the reason it cannot be.

Language, in order: `--lang CODE` for every record; the record's language field (`lang`); the source
name's second `_` field (ApolloMoE: `medicalExam_sw` -> `sw`), the source name being the record's
`source` field or else the input file's name without extension. A code the table writes differently
(`EN`, `pt_BR`) is resolved by the registry; the record keeps the table's code and the code as written.

The class is the record's `class` field as written (the ApolloMoE release marks each record `major` or
`minor`); a record without one is unclassified.

A UTF-8 byte-order mark at the start of a line (the first line of a file saved by some editors, or every
file of a concatenation) is ignored. A lone UTF-16 surrogate (JSON `"\ud800"`, half of a pair) is not a
character, so no tokenizer can encode it: such a record is refused, not passed on.
"""
from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..languages import LanguageRegistry, LanguageTableError
from ..languages.registry import AmbiguousLanguageCode
from .chat import (CONVERSATION_FIELDS, ChatRecordError, conversation_turns, render_apollo,
                   render_with_tokenizer_template)

FORMATS = ("text", "chat")

# reasons a record is refused, as counted in the summary
REASONS = ("invalid_utf8", "invalid_unicode", "malformed_json", "not_an_object", "missing_text", "empty_text",
           "missing_language", "unknown_language", "ambiguous_language", "no_answer", "bad_conversation", "bad_class")


class RecordError(ValueError):
    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class Record:
    text: str
    loss_spans: Optional[List[Tuple[int, int]]]  # None: loss on every token (raw text)
    lang: str  # the table's code
    source: str
    lang_given: Optional[str] = None  # the code as the record (or --lang) wrote it, when that differs
    record_class: Optional[str] = None  # the record's class field (ApolloMoE: major | minor); None: none given


def source_language(source: str) -> Optional[str]:
    parts = source.split("_")
    return parts[1] if len(parts) >= 2 and parts[1] else None


@dataclass
class RecordParser:
    fmt: str
    registry: LanguageRegistry
    lang: Optional[str] = None
    lang_field: str = "lang"
    source_field: str = "source"
    text_field: str = "text"
    template: str = "apollo"
    chat_tokenizer: object = None  # a transformers tokenizer, for template="tokenizer"
    class_field: str = "class"

    @property
    def fields(self) -> frozenset:
        """The record fields parsing reads (of a Parquet file, only these columns are read)."""
        content = {self.text_field} if self.fmt == "text" else set(CONVERSATION_FIELDS)
        return frozenset({self.lang_field, self.source_field, self.class_field, *content})

    def parse(self, raw: bytes, path: str) -> Record:
        """A record as JSON text (a line, an array's item)."""
        if raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the record") from None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            where = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno} of the record"
            raise RecordError("malformed_json", f"malformed JSON ({e.msg}, {where})") from None
        # only a \u escape can make a lone surrogate out of valid UTF-8
        return self.parse_object(record, path, escaped=b"\\u" in raw)

    def parse_object(self, record, path: str, escaped: bool = False) -> Record:
        """A record already decoded (a Parquet row: its strings are valid UTF-8, so none has a lone surrogate)."""
        if not isinstance(record, dict):
            raise RecordError("not_an_object", f"expected a JSON object, got {_json_type(record)}")
        source = record.get(self.source_field)
        if not isinstance(source, str) or not source:
            source = os.path.splitext(os.path.basename(path))[0]
        elif escaped:
            _check_characters(source, f'"{self.source_field}"')
        record_class = record.get(self.class_field)
        if record_class == "":
            record_class = None
        elif record_class is not None:
            if not isinstance(record_class, str):
                raise RecordError("bad_class", f'"{self.class_field}" must be a string such as "major", got '
                                  f"{_json_type(record_class)}")
            if escaped:
                _check_characters(record_class, f'"{self.class_field}"')
        lang, lang_given = self._language(record, source)
        if self.fmt == "text":
            text = record.get(self.text_field)
            if not isinstance(text, str):
                raise RecordError("missing_text", f'missing field "{self.text_field}"')
            if not text.strip():
                raise RecordError("empty_text", f'empty "{self.text_field}"')
            if escaped:
                _check_characters(text, f'"{self.text_field}"')
            return Record(text, None, lang, source, lang_given, record_class)
        try:
            turns = conversation_turns(record)
            if self.template == "apollo":
                text, spans = render_apollo(turns)
            else:
                text, spans = render_with_tokenizer_template(turns, self.chat_tokenizer)
        except ChatRecordError as e:
            reason = "no_answer" if "no answer" in str(e) else "bad_conversation"
            raise RecordError(reason, str(e)) from None
        if escaped:
            _check_characters(text, "the conversation")
        return Record(text, spans, lang, source, lang_given, record_class)

    def _language(self, record: dict, source: str) -> Tuple[str, Optional[str]]:
        """(the table's code, the code as written when it differs)."""
        if self.lang is not None:
            code = self.lang
        elif isinstance(record.get(self.lang_field), str):
            code = record[self.lang_field]
        else:
            code = source_language(source)
            if code is None:
                raise RecordError("missing_language", f'no "{self.lang_field}" field and the source name '
                                  f"{source!r} has no language part (like medicalExam_sw)")
        try:
            canonical = self.registry.canonical_code(code)
        except AmbiguousLanguageCode as e:
            raise RecordError("ambiguous_language", str(e)) from None
        except LanguageTableError as e:
            raise RecordError("unknown_language", str(e)) from None
        return canonical, (None if canonical == code else code)


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _check_characters(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError("invalid_unicode", f"{what} has a lone surrogate \\u{ord(value[e.start]):04x} at character "
                          f"{e.start} (half of a UTF-16 pair, not a character)") from None
