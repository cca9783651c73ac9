"""Raw-text JSONL documents, one `{"text": ..., "lang": ...}` per line, read with their language checked.

Every problem names the file and line: malformed JSON, a missing or empty field, an unknown language.
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from typing import Iterator, List, Sequence

from ..languages import LanguageRegistry, LanguageTableError


class CorpusError(ValueError):
    """A record that cannot be used, with its file and line."""


@dataclass(frozen=True)
class Document:
    text: str
    lang: str
    family_id: int  # the routing id of the document's language
    source: str  # file:line


def expand_paths(patterns: Sequence[str]) -> List[str]:
    files: List[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise CorpusError(f"{pattern!r} matches no file")
        files += matched
    return files


def read_text_documents(patterns: Sequence[str], registry: LanguageRegistry,
                        language_field: str = "lang") -> Iterator[Document]:
    for path in expand_paths(patterns):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from e
                if not isinstance(record, dict):
                    raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
                text, lang = record.get("text"), record.get(language_field)
                if not isinstance(text, str) or not text.strip():
                    raise CorpusError(f"{where}: missing or empty \"text\"")
                if not isinstance(lang, str):
                    raise CorpusError(f"{where}: missing language field {language_field!r}")
                try:
                    family_id = registry.expert_id(lang)
                except LanguageTableError as e:
                    raise CorpusError(f"{where}: {e}") from e
                yield Document(text=text, lang=lang, family_id=family_id, source=where)
