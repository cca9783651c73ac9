"""The configuration reference (docs/configuration.md), rendered from the dataclasses and their comments."""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import List

from .schema import RunConfig

_FIELD = re.compile(r"^\s+(\w+):\s*[^=]+?(?:=\s*(.+?))?\s*(?:#\s*(.*))?$")


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)][0]
        return f"{_type_name(inner)} or null"
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return hint.__name__


def _comments(cls) -> dict:
    """Field name -> its comment (the line's trailing comment, plus full-line comments just above)."""
    out, pending = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        match = _FIELD.match(line)
        if match:
            text = " ".join(pending + ([match.group(3)] if match.group(3) else []))
            out[match.group(1)] = text
        pending = []
    return out


def render_reference() -> str:
    lines: List[str] = [
        "# Configuration reference",
        "",
        "Generated from `megatron_medmoe/config/schema.py` by `python tools/render_config_reference.py`; a test",
        "keeps it current. A recipe is a YAML file with these sections; any field can be overridden on the",
        "command line as `section.field=value` (values are read as YAML: `null`, `true`, `[a, b]`, `1e-4`).",
        "Everything is validated once at load; the resolved config is printed and saved as `run_config.yaml`.",
        "",
        "Two top-level keys are not sections:",
        "",
        "- `base: OTHER.yaml` (a path relative to the recipe): start from that recipe; this recipe's fields",
        "  replace the base's one by one, and its `stages` replace the base's stages.",
        "- `stages: [{name: NAME, <section>: {...}}, ...]`: run stage after stage, each with the recipe's sections",
        "  updated by its own; a stage writes to `logging.output_dir/NAME` and `checkpoint.save/NAME` and starts",
        "  from the previous stage's final weights with a fresh optimizer (unless it sets `checkpoint.load`).",
        "  `medmoe train RECIPE --stage NAME` runs one; `stages.NAME.section.field=value` overrides one.",
        "",
    ]
    hints = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        lines += _table(f"`{section.name}`", hints[section.name])
    return "\n".join(lines)


def _table(title: str, cls) -> List[str]:
    lines = [f"## {title}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
    comments, field_hints = _comments(cls), typing.get_type_hints(cls)
    nested = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "null" if default is None else (str(default).lower() if isinstance(default, bool) else default)
        lines.append(f"| `{f.name}` | {_type_name(field_hints[f.name])} | `{shown}` | {comments.get(f.name, '')} |")
        item = typing.get_args(field_hints[f.name])
        if typing.get_origin(field_hints[f.name]) is list and item and dataclasses.is_dataclass(item[0]):
            nested.append((f.name, item[0]))
    lines.append("")
    for name, item in nested:
        lines += _table(f"`{title.strip('`')}.{name}` entries ({item.__name__})", item)
    return lines
