"""The release's tables, read from this folder's data files: prompt templates per source (templates.yaml) and how
sources become major-language numbers (sources.yaml). Both are checked once, when first used."""
from __future__ import annotations

import functools
import os
import string
from dataclasses import dataclass
from typing import Dict, FrozenSet, Tuple

import yaml

HERE = os.path.dirname(__file__)
TEMPLATES_FILE = os.path.join(HERE, "templates.yaml")
SOURCES_FILE = os.path.join(HERE, "sources.yaml")
TEMPLATE_FIELDS = frozenset({"question", "options", "answer", "context"})
RULES = ("single", "mean", "weighted")


class ReleaseTableError(ValueError):
    """A table file of this folder that is not shaped as expected (a broken installation or a bad edit)."""


@dataclass(frozen=True)
class Template:
    name: str
    shot: str  # a few-shot example, answer included, ending in <|endoftext|>\n
    question: str  # the question itself, ending in "Assistant:"

    @property
    def fields(self) -> FrozenSet[str]:
        """The item fields the template fills in (those of the shot and the question together)."""
        return frozenset(_placeholders(self.shot) | _placeholders(self.question))


@dataclass(frozen=True)
class TemplateTable:
    budget_chars: int
    shots: int
    fallback: str
    sources: Dict[str, str]  # source -> template name
    templates: Dict[str, Template]

    def template_for(self, source: str) -> Template:
        return self.templates[self.sources.get(source, self.fallback)]


@dataclass(frozen=True)
class MajorLanguage:
    lang: str
    column: str  # the release's column name, e.g. "weighted-average-de"
    rule: str  # single | mean | weighted
    sources: Tuple[str, ...]  # the release's list for the language
    counted: Tuple[str, ...]  # those its number is made of


@dataclass(frozen=True)
class SourceTable:
    major: Tuple[MajorLanguage, ...]  # the release's column order

    @functools.cached_property
    def language_of(self) -> Dict[str, str]:
        """Every major source the release lists -> its language."""
        return {source: lang.lang for lang in self.major for source in lang.sources}


def _placeholders(text: str):
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def _fail(path: str, message: str):
    raise ReleaseTableError(f"{path}: {message}")


def _load(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        _fail(path, f"cannot be read ({e}); reinstall megatron-medmoe")
    if not isinstance(data, dict):
        _fail(path, "expected a mapping at the top")
    return data


@functools.lru_cache(maxsize=None)
def template_table(path: str = TEMPLATES_FILE) -> TemplateTable:
    data = _load(path)
    templates: Dict[str, Template] = {}
    for name, entry in (data.get("templates") or {}).items():
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("shot", "question")):
            _fail(path, f"template {name!r} needs string fields `shot` and `question`")
        template = Template(name, entry["shot"], entry["question"])
        unknown = template.fields - TEMPLATE_FIELDS
        if unknown:
            _fail(path, f"template {name!r} uses {sorted(unknown)}; the fields are {sorted(TEMPLATE_FIELDS)}")
        templates[name] = template
    sources = data.get("sources") or {}
    for source, name in sources.items():
        if name not in templates:
            _fail(path, f"source {source!r} names template {name!r}, which is not under `templates`")
    fallback = data.get("fallback")
    if fallback not in templates:
        _fail(path, f"`fallback` {fallback!r} is not under `templates`")
    budget, shots = data.get("budget_chars"), data.get("shots")
    if not isinstance(budget, int) or budget < 1 or not isinstance(shots, int) or shots < 0:
        _fail(path, "`budget_chars` must be a positive integer and `shots` 0 or more")
    return TemplateTable(budget, shots, fallback, dict(sources), templates)


@functools.lru_cache(maxsize=None)
def source_table(path: str = SOURCES_FILE) -> SourceTable:
    data = _load(path)
    languages = []
    seen: Dict[str, str] = {}
    for entry in data.get("major") or []:
        lang, column, rule = entry.get("lang"), entry.get("column"), entry.get("rule")
        sources = tuple(entry.get("sources") or ())
        counted = tuple(entry.get("counted") or sources)
        if not (isinstance(lang, str) and isinstance(column, str) and rule in RULES and sources):
            _fail(path, f"entry {entry!r}: needs `lang`, `column`, `rule` (one of {', '.join(RULES)}) and `sources`")
        if not set(counted) <= set(sources) or (rule == "single" and len(counted) != 1):
            _fail(path, f"language {lang!r}: `counted` must be among its `sources` (one for rule single)")
        for source in sources:
            if source in seen:
                _fail(path, f"source {source!r} is listed for both {seen[source]!r} and {lang!r}")
            seen[source] = lang
        languages.append(MajorLanguage(lang, column, rule, sources, counted))
    if not languages:
        _fail(path, "no `major` languages")
    return SourceTable(tuple(languages))


def minor_language_codes(source: str) -> Tuple[str, ...]:
    """The language code(s) the release's results_collection_minor.py reads off a source name: the 2 or 3
    characters after a '-' that is third or fourth from the end (`...-sw`, `...-ceb`); none for other names."""
    codes = []
    if len(source) >= 3 and source[-3] == "-":
        codes.append(source[-2:])
    if len(source) >= 4 and source[-4] == "-":
        codes.append(source[-3:])
    return tuple(codes)

