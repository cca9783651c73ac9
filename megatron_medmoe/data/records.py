"""One JSONL line -> the text to tokenize, its loss spans, language and source; or the reason it cannot be.

Language, in order: `--lang CODE` for every record; the record's language field (`lang`); the source
name's second `_` field (ApolloMoE: `medicalExam_sw` -> `sw`), the source name being the record's
`source` field or else the input file's name without extension.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..languages import LanguageRegistry, LanguageTableError
from .chat import ChatRecordError, conversation_turns, render_apollo, render_with_tokenizer_template

FORMATS = ("text", "chat")

# reasons a record is refused, as counted in the summary
REASONS = ("invalid_utf8", "malformed_json", "not_an_object", "missing_text", "empty_text", "missing_language",
           "unknown_language", "no_answer", "bad_conversation")


class RecordError(ValueError):
    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class Record:
    text: str
    loss_spans: Optional[List[Tuple[int, int]]]  # None: loss on every token (raw text)
    lang: str
    source: str


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

    def parse(self, raw: bytes, path: str) -> Record:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError("invalid_utf8", f"invalid UTF-8 at byte {e.start}") from None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError("malformed_json", f"malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict):
            raise RecordError("not_an_object", f"expected a JSON object, got {type(record).__name__}")
        source = record.get(self.source_field)
        if not isinstance(source, str) or not source:
            source = os.path.splitext(os.path.basename(path))[0]
        lang = self._language(record, source)
        if self.fmt == "text":
            text = record.get(self.text_field)
            if not isinstance(text, str):
                raise RecordError("missing_text", f'missing field "{self.text_field}"')
            if not text.strip():
                raise RecordError("empty_text", f'empty "{self.text_field}"')
            return Record(text, None, lang, source)
        try:
            turns = conversation_turns(record)
            if self.template == "apollo":
                text, spans = render_apollo(turns)
            else:
                text, spans = render_with_tokenizer_template(turns, self.chat_tokenizer)
        except ChatRecordError as e:
            reason = "no_answer" if "no answer" in str(e) else "bad_conversation"
            raise RecordError(reason, str(e)) from None
        return Record(text, spans, lang, source)

    def _language(self, record: dict, source: str) -> str:
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
            self.registry.language(code)
        except LanguageTableError as e:
            raise RecordError("unknown_language", str(e)) from None
        return code
