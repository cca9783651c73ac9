"""The language registry: the one place that knows language codes, their families and their experts.

A table is a YAML data file (see families.yaml): an ordered list of experts (index = routing id) and one
record per language. Built-in tables are addressed by name (`families`, `languages12`); any other value
is a path to a user's own table.
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

    def __post_init__(self):
        object.__setattr__(self, "_by_code", {lang.code: lang for lang in self.languages})
        object.__setattr__(self, "_expert_index", {name: i for i, name in enumerate(self.experts)})

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def codes(self) -> List[str]:
        return [lang.code for lang in self.languages]

    def language(self, code: str) -> Language:
        found = self._by_code.get(code)
        if found is None:
            raise LanguageTableError(
                f"unknown language code {code!r} (table {self.source}); known codes: "
                + ", ".join(sorted(self.codes))
            )
        return found

    def expert_id(self, code: str) -> int:
        """The routing id (expert index) of a language: the family id that its tokens carry."""
        return self._expert_index[self.language(code).expert]

    def languages_of_expert(self, expert_id: int) -> List[str]:
        name = self.experts[expert_id]
        return [lang.code for lang in self.languages if lang.expert == name]


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
