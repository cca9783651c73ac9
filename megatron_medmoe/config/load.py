"""Read a YAML recipe plus `key=value` overrides into a typed RunConfig, and write it back out.

Every key is checked against the dataclasses in schema.py: an unknown key or a value of the wrong type
is an error naming the key (with the closest known key as a suggestion), collected for all keys at once.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, List, Sequence, Tuple

import yaml

from .schema import RunConfig


class ConfigError(ValueError):
    """One or more problems with a configuration, each naming the field and the rule it breaks."""

    def __init__(self, problems: Sequence[str], source: str = ""):
        self.problems = list(problems)
        head = f"invalid configuration{f' ({source})' if source else ''}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


def load_config(path: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Parse a recipe file (or the defaults when path is None) and apply `section.key=value` overrides."""
    raw: Dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError([f"recipe file {path!r} does not exist"])
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError([f"not valid YAML: {e}"], path) from e
        if not isinstance(raw, dict):
            raise ConfigError(["the top level must be a mapping of sections (model:, moe:, parallel:, ...)"], path)
    problems: List[str] = []
    for item in overrides:
        key, value, problem = _parse_override(item)
        if problem:
            problems.append(problem)
            continue
        section, _, name = key.partition(".")
        if not name:
            problems.append(f"override {item!r}: expected section.key=value, e.g. parallel.tensor=2")
            continue
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            problems.append(f"override {item!r}: `{section}` is not a section")
            continue
        target[name] = value
    cfg = _build(RunConfig, raw, "", problems)
    if problems:
        raise ConfigError(problems, path or "defaults")
    return cfg


def _parse_override(item: str) -> Tuple[str, Any, str]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        return "", None, f"override {item!r}: expected key=value, e.g. training.train_steps=50"
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        return "", None, f"override {item!r}: value is not valid YAML: {e}"
    return key.strip(), value, ""


def _build(cls, raw: Any, prefix: str, problems: List[str]):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(full, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys here: {', '.join(names)}"
            problems.append(f"{full}: unknown key{hint}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{full}.", problems)
        else:
            ok, coerced, expected = _coerce(value, hint)
            if ok:
                kwargs[key] = coerced
            else:
                problems.append(f"{full}: expected {expected}, got {value!r}")
    return cls(**kwargs)


def _coerce(value: Any, hint) -> Tuple[bool, Any, str]:
    """Check (and gently convert) one value against a type annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return True, None, "null"
        inner = [a for a in args if a is not type(None)][0]
        ok, coerced, expected = _coerce(value, inner)
        return ok, coerced, f"{expected} or null"
    if origin is typing.Literal:
        return value in args, value, "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, List):
        (item,) = args
        if not isinstance(value, list):
            return False, value, f"a list of {item.__name__}"
        out = []
        for v in value:
            if dataclasses.is_dataclass(item):
                problems: List[str] = []
                built = _build(item, v, "", problems)
                if problems:
                    return False, value, f"a list of {item.__name__} ({'; '.join(problems)})"
                out.append(built)
                continue
            ok, c, _ = _coerce(v, item)
            if not ok:
                return False, value, f"a list of {item.__name__}"
            out.append(c)
        return True, out, ""
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if hint is float:
        if isinstance(value, bool):
            return False, value, "a number"
        if isinstance(value, (int, float)):
            return True, float(value), ""
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return True, float(value), ""
            except ValueError:
                pass
        return False, value, "a number"
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value), ""
        return isinstance(value, str), value, "a string"
    raise TypeError(f"unsupported config annotation {hint!r}")


def config_to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg, path: str | None = None) -> str:
    """The resolved config as YAML (written atomically to `path` when given)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return text
