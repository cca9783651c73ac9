"""The language registry: the one place that knows language codes, their families and their experts.

A table is a YAML data file (see families.yaml): an ordered list of experts (index = routing id) and one
record per language. Built-in tables are addressed by name (`families`, `languages12`); any other value
is a path to a user's own table.

Codes are looked up exactly first; a code in another case or with a region or script (`EN`, `zh-CN`, `pt_BR`)
resolves to the table's code when exactly one table code matches it (ignoring case and `_`/`-`, then
without the subtags after the language), so corpora, questions and options written in BCP 47 or POSIX
style need no rewriting. `canonical_code` says what a code resolved to.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import yaml

BUILTIN_TABLES = {
    "families": os.path.join(os.path.dirname(__file__), "families.yaml"),
    "languages12": os.path.join(os.path.dirname(__file__), "languages12.yaml"),
}
TIERS = ("major", "minor")


class LanguageTableError(ValueError):
    """A language table that cannot be used, or a language code it does not know."""


class AmbiguousLanguageCode(LanguageTableError):
    """A code that matches more than one of the table's codes once case and region are set aside."""


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    family: str
    expert: str
    tier: str

    @property
    def is_major(self) -> bool:
        return self.tier == "major"


@dataclass(frozen=True)
class LanguageRegistry:
    source: str
    experts: Tuple[str, ...]
    languages: Tuple[Language, ...]
    _by_code: Dict[str, Language] = field(init=False, repr=False, compare=False)
    _expert_index: Dict[str, int] = field(init=False, repr=False, compare=False)
    _by_key: Dict[str, List[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_code", {lang.code: lang for lang in self.languages})
        object.__setattr__(self, "_expert_index", {name: i for i, name in enumerate(self.experts)})
        by_key: Dict[str, List[str]] = {}
        for lang in self.languages:
            by_key.setdefault(_code_key(lang.code), []).append(lang.code)
        object.__setattr__(self, "_by_key", by_key)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def codes(self) -> List[str]:
        return [lang.code for lang in self.languages]

    def canonical_code(self, code: str) -> str:
        """The table's code for `code` (itself when the table has it as written)."""
        if not isinstance(code, str):
            raise LanguageTableError(f"a language code must be a string, got {code!r}")
        if code in self._by_code:
            return code
        key = _code_key(code)
        matches = self._by_key.get(key, [])
        if not matches and "-" in key:  # en-US, zh-Hans-CN: the language without its region or script
            matches = self._by_key.get(key.split("-", 1)[0], [])
        if len(matches) == 1:
            return matches[0]
        known = "; known codes: " + ", ".join(sorted(self.codes))
        if matches:
            raise AmbiguousLanguageCode(f"language code {code!r} is ambiguous in table {self.source}: it could be "
                                     + " or ".join(repr(m) for m in sorted(matches)) + known)
        raise LanguageTableError(f"unknown language code {code!r} (table {self.source})" + known)

    def language(self, code: str) -> Language:
        return self._by_code[self.canonical_code(code)]

    def expert_id(self, code: str) -> int:
        """The routing id (expert index) of a language: the family id that its tokens carry."""
        return self._expert_index[self.language(code).expert]

    def languages_of_expert(self, expert_id: int) -> List[str]:
        name = self.experts[expert_id]
        return [lang.code for lang in self.languages if lang.expert == name]


def _code_key(code: str) -> str:
    return code.strip().lower().replace("_", "-")


def resolve_table_path(table: str) -> str:
    return BUILTIN_TABLES.get(table, table)


def load_registry(table: str = "families") -> LanguageRegistry:
    """Load a built-in table by name or a user's table by path, checking it thoroughly."""
    path = resolve_table_path(table)
    if not os.path.isfile(path):
        raise LanguageTableError(
            f"language table {table!r} not found: give one of {sorted(BUILTIN_TABLES)} or a path to a "
            "YAML file shaped like megatron_medmoe/languages/families.yaml"
        )
    stat = os.stat(path)
    return _load_table(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _load_table(path: str, mtime_ns: int, size: int) -> LanguageRegistry:
    """Parsed once per version of the file (a registry is immutable; validation resolves configs often)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise LanguageTableError(f"{path}: not valid YAML: {e}") from e
    return _parse_table(raw, path)


def _parse_table(raw, path: str) -> LanguageRegistry:
    def fail(msg: str):
        raise LanguageTableError(f"{path}: {msg}")

    if not isinstance(raw, dict) or set(raw) != {"experts", "languages"}:
        fail("expected exactly two top-level keys, `experts` (a list) and `languages` (a list of records)")
    experts = raw["experts"]
    if not isinstance(experts, list) or not experts or not all(isinstance(e, str) for e in experts):
        fail("`experts` must be a non-empty list of expert names")
    if len(set(experts)) != len(experts):
        fail(f"`experts` has duplicate names: {experts}")
    records = raw["languages"]
    if not isinstance(records, list) or not records:
        fail("`languages` must be a non-empty list")
    fields = ("code", "name", "family", "expert", "tier")
    languages, seen = [], set()
    for i, rec in enumerate(records):
        where = f"languages[{i}]"
        if not isinstance(rec, dict) or set(rec) != set(fields):
            fail(f"{where}: expected exactly the fields {list(fields)}, got {rec!r}")
        for key in fields:
            if not isinstance(rec[key], str) or not rec[key]:
                # YAML reads a bare `no` (Norwegian) as false: such codes must be quoted.
                fail(f"{where}.{key}: expected a non-empty string, got {rec[key]!r} (quote codes like \"no\")")
        if rec["code"] in seen:
            fail(f"{where}: language code {rec['code']!r} appears twice")
        if rec["expert"] not in experts:
            fail(f"{where}: expert {rec['expert']!r} of {rec['code']!r} is not in `experts` {experts}")
        if rec["tier"] not in TIERS:
            fail(f"{where}: tier must be one of {TIERS}, got {rec['tier']!r}")
        seen.add(rec["code"])
        languages.append(Language(**{k: rec[k] for k in fields}))
    unused = [e for e in experts if not any(lang.expert == e for lang in languages)]
    if unused:
        fail(f"experts with no language: {unused} (every expert needs at least one language)")
    return LanguageRegistry(source=path, experts=tuple(experts), languages=tuple(languages))
