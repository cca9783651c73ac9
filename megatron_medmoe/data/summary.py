"""What preprocessing read: a table per language, per family and per class, and a PNG bar chart of the first two."""
from __future__ import annotations

from typing import BinaryIO, List, Union


def summary_table(summary: dict) -> str:
    lines: List[str] = []
    langs = sorted(summary["per_language"].items(), key=lambda kv: -kv[1]["tokens"])
    width = max([len(v["name"]) for _, v in langs] + [8])
    lines.append(f"{'code':<5} {'language':<{width}} {'family':<14} {'documents':>10} {'tokens':>12}")
    for code, v in langs:
        lines.append(f"{code:<5} {v['name']:<{width}} {v['family']:<14} {v['documents']:>10,} {v['tokens']:>12,}")
    lines.append("")
    lines.append(f"{'family':<{width + 6}} {'':<14} {'documents':>10} {'tokens':>12}")
    for family, v in summary["per_family"].items():
        lines.append(f"{family:<{width + 6}} {'':<14} {v['documents']:>10,} {v['tokens']:>12,}")
    lines.append(f"{'total':<{width + 6}} {'':<14} {summary['documents']:>10,} {summary['tokens']:>12,}")
    per_class = summary.get("per_class") or {}  # absent from summaries of older versions
    if per_class:
        lines.append("")
        lines.append(f"{'class':<{width + 6}} {'':<14} {'documents':>10} {'tokens':>12}")
        unclassified = summary["unclassified"]
        for name, v in [*per_class.items(), *([("unclassified", unclassified)] if unclassified["documents"] else [])]:
            lines.append(f"{name:<{width + 6}} {'':<14} {v['documents']:>10,} {v['tokens']:>12,}")
    normalised = summary.get("normalised_languages") or {}  # absent from summaries of older versions
    if normalised:
        lines.append("")
        lines.append("language codes normalised to the table's: " + ", ".join(
            f"{given} -> {v['code']} ({v['documents']:,} document{'s' if v['documents'] != 1 else ''})"
            for given, v in normalised.items()))
    if summary["skipped"]:
        lines.append("")
        lines.append("skipped records: " + ", ".join(f"{reason} {n:,}" for reason, n in sorted(summary["skipped"].items())))
        for reason, example in sorted(summary["skipped_examples"].items()):
            lines.append(f"  e.g. {example}")
    return "\n".join(lines)


def import_backend():
    """matplotlib's object API with the Agg canvas: no pyplot, no GUI backend (half the start-up time)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return FigureCanvasAgg, Figure


def write_chart(summary: dict, out: Union[str, BinaryIO]) -> None:
    """A PNG to a path or to a binary file."""
    FigureCanvasAgg, Figure = import_backend()

    langs = sorted(summary["per_language"].items(), key=lambda kv: -kv[1]["tokens"])
    fams = list(summary["per_family"].items())
    fig = Figure(figsize=(12, 2.5 + 0.25 * max(len(langs), len(fams))))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, squeeze=False)
    for col, key in enumerate(("documents", "tokens")):
        for row, (items, title) in enumerate(((langs, "per language"), (fams, "per family"))):
            ax = axes[row][col]
            names = [k for k, _ in items][::-1]
            ax.barh(names, [v[key] for _, v in items][::-1], color="#3b6ea5" if row == 0 else "#b5543c")
            ax.set_title(f"{key} {title}")
            ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"{summary['format']} corpus: {summary['documents']:,} documents, {summary['tokens']:,} tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=80, format="png")
