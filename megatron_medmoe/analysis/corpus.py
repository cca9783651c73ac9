"""Per-language text for the analysis tools: `--data LANG=PATH` -> rows of token ids, no padding.

PATH is a JSONL file of raw text ({"text": ...}) or chat records ({"conversations": [...]}, rendered in the
ApolloMoE chat format), or a plain .txt file (one document per line). The language is the one named on
the command line for every record. A language's documents are tokenized, joined with the end-of-text token
and cut into rows of `seq_length`; the last row keeps whatever is left (shorter, never padded), so every
counted token is a real one. `max_tokens` caps a language's tokens (the first ones, in file order).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..data.records import RecordError, RecordParser
from ..data.tokenizer import FastTokenizer
from ..languages import LanguageRegistry, LanguageTableError


class CorpusError(ValueError):
    """A --data argument or file that cannot be read; names what and where."""


@dataclass
class LanguageText:
    lang: str
    path: str
    rows: List[torch.Tensor]  # [s] int64 each; all seq_length long except possibly the last
    documents: int

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


def parse_data_args(items: Sequence[str], registry: LanguageRegistry) -> Dict[str, str]:
    """['zh=path', ...] -> {lang: path}, languages checked against the registry, files against the disk."""
    out: Dict[str, str] = {}
    for item in items:
        lang, sep, path = item.partition("=")
        if not sep or not lang or not path:
            raise CorpusError(f"--data {item!r}: expected LANG=PATH, e.g. zh=corpus/zh.jsonl")
        try:
            lang = registry.language(lang).code  # as the table writes it: EN and en are one language
        except LanguageTableError as e:
            raise CorpusError(f"--data {item!r}: {e}") from None
        if lang in out:
            raise CorpusError(f"--data names {lang!r} twice ({out[lang]} and {path})")
        if not os.path.isfile(path):
            raise CorpusError(f"--data {item!r}: no such file {path!r}")
        out[lang] = path
    if not out:
        raise CorpusError("no --data LANG=PATH given")
    return out


def _documents(path: str, lang: str, registry: LanguageRegistry) -> List[str]:
    if not path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8", errors="strict") as f:
            return [line.strip() for line in f if line.strip()]
    parsers = {fmt: RecordParser(fmt, registry, lang=lang) for fmt in ("text", "chat")}
    docs = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            fmt = "chat" if b'"conversations"' in raw else "text"
            try:
                docs.append(parsers[fmt].parse(raw, path).text)
            except RecordError as e:
                raise CorpusError(f"{path}:{number}: {e}") from None
    return docs


def read_language(lang: str, path: str, tokenizer: FastTokenizer, registry: LanguageRegistry, seq_length: int,
                  max_tokens: Optional[int] = None) -> LanguageText:
    try:
        docs = _documents(path, lang, registry)
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e})") from None
    if not docs:
        raise CorpusError(f"{path}: no documents")
    ids: List[int] = []
    for encoding in tokenizer.backend.encode_batch(docs, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(tokenizer.end_of_text_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    flat = torch.tensor(ids, dtype=torch.long)
    return LanguageText(lang, path, list(torch.split(flat, seq_length)), len(docs))


def batches(rows: List[torch.Tensor], batch_size: int):
    """Rows of the same length stacked [b, s], in order (the short last row on its own)."""
    i = 0
    while i < len(rows):
        j = i
        while j < len(rows) and j - i < batch_size and len(rows[j]) == len(rows[i]):
            j += 1
        yield torch.stack(rows[i:j])
        i = j
