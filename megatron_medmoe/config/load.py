"""Read a YAML recipe plus `key=value` overrides into a typed RunConfig, and write it back out.

Every key is checked against the dataclasses in schema.py: an unknown key or a value of the wrong type
is an error naming the key (with the closest known key as a suggestion), collected for all keys at once.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .schema import RunConfig


class ConfigError(ValueError):
    """One or more problems with a configuration, each naming the field and the rule it breaks."""

    def __init__(self, problems: Sequence[str], source: str = ""):
        self.problems = list(dict.fromkeys(problems))  # a recipe's stages may repeat a problem
        head = f"invalid configuration{f' ({source})' if source else ''}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))


STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Stage:
    name: str  # "" for a recipe without stages
    config: RunConfig
    previous: Optional[str] = None  # the stage whose final weights this one starts from
    weights_from: Optional[str] = None  # that stage's save directory (None: it saves nothing)


def _read_recipe(path: str | None, seen: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """The recipe's sections; `base: OTHER.yaml` (relative to the recipe) is read first and the recipe's own
    fields replace its fields one by one (a recipe's `stages` replace the base's)."""
    if path is None:
        return {}
    if not os.path.isfile(path):
        where = f" (the base of {seen[-1]!r})" if seen else ""
        raise ConfigError([f"recipe file {path!r}{where} does not exist"])
    if os.path.realpath(path) in seen:
        raise ConfigError([f"recipes name each other as base in a cycle: {' -> '.join([*seen, path])}"])
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], path) from e
    if not isinstance(raw, dict):
        raise ConfigError(["the top level must be a mapping of sections (model:, moe:, parallel:, ...)"], path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError([f"base: expected the path of another recipe, got {base!r}"], path)
    merged = _read_recipe(os.path.join(os.path.dirname(path), base), (*seen, os.path.realpath(path)))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def _apply_overrides(raw: Dict[str, Any], overrides: Sequence[Tuple[str, Any]], problems: List[str]) -> None:
    for key, value in overrides:
        section, _, name = key.partition(".")
        if not name:
            problems.append(f"override {key}: expected section.key=value, e.g. parallel.tensor=2")
            continue
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            problems.append(f"override {key}: `{section}` is not a section")
            continue
        target[name] = value


def load_config(path: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Parse a recipe without stages (or the defaults when path is None) plus `section.key=value` overrides."""
    stages = load_stages(path, overrides)
    if len(stages) != 1 or stages[0].name:
        raise ConfigError([f"the recipe has stages {[s.name for s in stages]}: load it with load_stages"], path or "")
    return stages[0].config


def load_stages(path: str | None, overrides: Sequence[str] = ()) -> List[Stage]:
    """A recipe's stages, each a complete config: the recipe's sections, then the stage's own, then the
    overrides (`section.key=value` for every stage, `stages.NAME.section.key=value` for one).

    In a recipe with stages each stage writes to OUTPUT_DIR/NAME and SAVE/NAME, and a stage after the first
    starts from the previous stage's final weights with a fresh optimizer (Stage.weights_from), unless it
    names its own checkpoint.load."""
    raw = _read_recipe(path)
    problems: List[str] = []
    common, per_stage = [], {}
    for item in overrides:
        key, value, problem = _parse_override(item)
        if problem:
            problems.append(problem)
        elif key.startswith("stages."):
            name, _, rest = key[len("stages."):].partition(".")
            per_stage.setdefault(name, []).append((rest, value))
        else:
            common.append((key, value))
    stages_raw = raw.pop("stages", None)
    if stages_raw is None:
        if per_stage:
            problems.append(f"overrides for stages {sorted(per_stage)}, but the recipe has no stages")
        _apply_overrides(raw, common, problems)
        cfg = _build(RunConfig, raw, "", problems)
        if problems:
            raise ConfigError(problems, path or "defaults")
        return [Stage("", cfg)]
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(["stages: expected a non-empty list of {name: ..., <sections>}"], path or "")
    stages: List[Stage] = []
    names = []
    for i, entry in enumerate(stages_raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
                not STAGE_NAME.match(entry["name"]) or entry["name"] in names:
            problems.append(f"stages[{i}]: expected a mapping with a unique `name` of letters, digits, _ or -")
            continue
        name = entry["name"]
        names.append(name)
        merged = copy.deepcopy(raw)
        for section, values in entry.items():
            if section == "name":
                continue
            if not isinstance(values, dict):
                problems.append(f"stages.{name}.{section}: expected a mapping of fields")
                continue
            merged.setdefault(section, {}).update(copy.deepcopy(values))
        _apply_overrides(merged, common + per_stage.get(name, []), problems)
        stage_problems: List[str] = []
        cfg = _build(RunConfig, merged, "", stage_problems)
        problems += [p for p in stage_problems if p not in problems]
        own_load = "load" in entry.get("checkpoint", {}) or any(
            k == "checkpoint.load" for k, _ in common + per_stage.get(name, []))
        stages.append(_stage_paths(name, cfg, stages[-1] if stages else None, own_load))
    unknown = sorted(set(per_stage) - set(names))
    if unknown:
        problems.append(f"overrides name stages {unknown}, but the recipe's stages are {names}")
    if problems:
        raise ConfigError(problems, path or "")
    return stages


def _stage_paths(name: str, cfg: RunConfig, previous: Optional[Stage], own_load: bool) -> Stage:
    cfg.logging.output_dir = os.path.join(cfg.logging.output_dir, name)
    if cfg.checkpoint.save:
        cfg.checkpoint.save = os.path.join(cfg.checkpoint.save, name)
    if previous is not None and not own_load:  # checkpoint.load is set when the stage runs (it exists by then)
        return Stage(name, cfg, previous=previous.name, weights_from=previous.config.checkpoint.save)
    return Stage(name, cfg)


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
