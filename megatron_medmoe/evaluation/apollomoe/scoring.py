"""Accuracy as the release computes it: per source (src/eval/eval_qwen2.py's score.json), then the columns of its
result tables (utils/results_collection_major.py with utils/test_source_major.json, utils/results_collection_minor.py).

- Per source: correct answers over the questions evaluated (the questions left out for the budget are not among
  them, as in the release). A question without a letter is wrong, and counted as unanswered.
- Major languages (the release's `class: major` run): the columns of sources.yaml, each by its rule: one source's
  accuracy (Arabic, Spanish, Hindi, Japanese, Korean, Russian), the unweighted mean of the sources' accuracies
  (English, Chinese), or correct over questions pooled over the sources (German, Portuguese, French, Italian).
- Minor languages (the `class: minor` run): a source counts for the language its name ends in (`...-sw`); where
  several sources end in one code the release's table keeps one of them, the last of its score.json, which lists
  sources in the order their first correct answer came.
- The major and the minor average: the unweighted mean of the columns present (the release's scripts print the
  columns; the average over them is the paper's).

Where the release cannot give a number, we give one and say so: a source without a single correct answer is
missing from the release's score.json (its collection then fails, or shows no column), here it scores 0; a
language with some of its sources absent is averaged over those present and lists the missing ones (the release
needs them all).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import mean
from typing import Dict, List, Mapping, Optional

from ...languages import LanguageTableError, load_registry
from ..scoring import SourceTotals, check_predictions
from .prompts import DroppedQuestion, ReleasePromptSet
from .tables import minor_language_codes, source_table


@dataclass(frozen=True)
class ReleaseSourceScore:
    lang: str  # our language table's code
    tier: str  # major | minor
    questions: int  # evaluated
    correct: int
    unanswered: int
    dropped: int  # left out for the budget

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.questions if self.questions else None


@dataclass(frozen=True)
class ReleaseLanguageScore:
    name: str
    column: str  # the release's column (major) or the source its number is (minor)
    rule: str  # single | mean | weighted | minor
    sources: List[str]  # the sources the number is made of
    missing: List[str]  # the release's sources for the language that were not evaluated
    not_counted: List[str]  # evaluated, but left out of the number by the release
    accuracy: float


@dataclass(frozen=True)
class ReleaseScores(SourceTotals):
    per_source: Dict[str, ReleaseSourceScore]  # in prompt order
    major: Dict[str, ReleaseLanguageScore]  # the release's column order
    minor: Dict[str, ReleaseLanguageScore]  # language-table order, then unknown codes
    not_averaged: List[str]  # evaluated sources no release table puts in a language
    dropped: List[DroppedQuestion]
    budget_chars: Optional[int]  # None: prompts read from a file, drops unknown

    @property
    def major_average(self) -> Optional[float]:
        return mean(s.accuracy for s in self.major.values()) if self.major else None

    @property
    def minor_average(self) -> Optional[float]:
        return mean(s.accuracy for s in self.minor.values()) if self.minor else None

    def to_dict(self) -> dict:
        return {
            "per_source": {name: {**asdict(s), "accuracy": s.accuracy} for name, s in self.per_source.items()},
            "major": {code: asdict(s) for code, s in self.major.items()},
            "minor": {code: asdict(s) for code, s in self.minor.items()},
            "major_average": self.major_average,
            "minor_average": self.minor_average,
            "not_averaged": self.not_averaged,
            "questions": self.questions,
            "correct": self.correct,
            "unanswered": self.unanswered,
            "dropped": {"budget_chars": self.budget_chars, "questions": len(self.dropped),
                        "per_source": _dropped_per_source(self.dropped), "ids": [d.qid for d in self.dropped]},
        }

    def table(self) -> str:
        header = ("source", "language", "class", "questions", "correct", "unanswered", "dropped", "accuracy")
        rows = [(name, s.lang, s.tier, str(s.questions), str(s.correct), str(s.unanswered), str(s.dropped),
                 _percent(s.accuracy)) for name, s in self.per_source.items()]
        out = _columns([header, *rows], left=3)
        for tier, languages, average in (("major", self.major, self.major_average),
                                         ("minor", self.minor, self.minor_average)):
            out.append("")
            if not languages:
                out.append(f"{tier}: no {tier} language evaluated")
                continue
            title = ("major: the columns of the release's Major_Test table" if tier == "major" else
                     "minor: the language a source's name ends in, as the release's Minor_Test table")
            out.append(title)
            lines = [("column", "language", "accuracy", "made of")]
            for code, lang in languages.items():
                notes = ", ".join(lang.sources)
                if lang.missing:
                    notes += f" (missing: {', '.join(lang.missing)})"
                if lang.not_counted:
                    notes += f" (not counted by the release: {', '.join(lang.not_counted)})"
                if lang.rule == "minor" and len(lang.sources) > 1:
                    notes += f" (the release's table shows {lang.column} only)"
                lines.append((lang.column, f"{code} {lang.name}", _percent(lang.accuracy), f"{lang.rule}: {notes}"))
            out.extend(_columns(lines, left=2, last_left=True))
            count = len(languages)
            out.append(f"{tier} average over {count} language{'s' if count != 1 else ''} (unweighted mean of the "
                       f"columns): {_percent(average)}")
        if self.not_averaged:
            out.append("")
            out.append(f"in no language of the release's tables (per source only): {', '.join(self.not_averaged)}")
        out.append("")
        if self.budget_chars is None:
            out.append("prompts read from a file: questions the release left out for its budget are not known here")
        else:
            per_source = ", ".join(f"{name} {n}" for name, n in _dropped_per_source(self.dropped).items())
            out.append(f"left out over the release's {self.budget_chars:,}-character prompt budget, as the release "
                       f"leaves them out: {len(self.dropped)} question{'s' if len(self.dropped) != 1 else ''}"
                       + (f" ({per_source})" if per_source else ""))
        return "\n".join(out)


def score_release(prompt_set: ReleasePromptSet, predictions: Mapping[str, Optional[str]],
                  language_table: str = "families") -> ReleaseScores:
    """Score the letters the release's extraction read (by prompt id; None: no letter) the release's way."""
    prompts = prompt_set.prompts
    check_predictions([p.qid for p in prompts], predictions, "prompt")

    counts: Dict[str, List[int]] = {}  # source -> [questions, correct, unanswered]
    first_correct: List[str] = []  # the order of the release's score.json
    kind: Dict[str, tuple] = {}
    for p in prompts:
        if kind.setdefault(p.source, (p.lang, p.tier)) != (p.lang, p.tier):
            raise ValueError(f"source {p.source!r} has prompts of two languages or classes, {kind[p.source]} and "
                             f"{(p.lang, p.tier)} (prompt {p.qid!r}); give each its own source name")
        c = counts.setdefault(p.source, [0, 0, 0])
        predicted = predictions[p.qid]
        c[0] += 1
        if predicted == p.answer:
            c[1] += 1
            if p.source not in first_correct:
                first_correct.append(p.source)
        c[2] += int(predicted is None)
    for d in prompt_set.dropped:  # a source all of whose questions were left out is still shown
        kind.setdefault(d.source, (d.lang, d.tier))
        counts.setdefault(d.source, [0, 0, 0])
    dropped = _dropped_per_source(prompt_set.dropped)
    per_source = {name: ReleaseSourceScore(kind[name][0], kind[name][1], *counts[name], dropped.get(name, 0))
                  for name in counts}
    major = _major(per_source)
    minor, unplaced = _minor(per_source, first_correct, language_table)
    listed = source_table().language_of
    not_averaged = [name for name, s in per_source.items()
                    if (s.tier == "major" and name not in listed) or name in unplaced]
    return ReleaseScores(per_source, major, minor, not_averaged, list(prompt_set.dropped), prompt_set.budget_chars)


def _major(per_source: Mapping[str, ReleaseSourceScore]) -> Dict[str, ReleaseLanguageScore]:
    registry = load_registry("families")  # names only; the release's 12 major languages are all in it
    evaluated = {name for name, s in per_source.items() if s.tier == "major" and s.questions}
    out: Dict[str, ReleaseLanguageScore] = {}
    for lang in source_table().major:
        counted = [s for s in lang.counted if s in evaluated]
        if not counted:
            continue
        scores = [per_source[s] for s in counted]
        if lang.rule == "weighted":
            accuracy = sum(s.correct for s in scores) / sum(s.questions for s in scores)
        else:  # single, mean
            accuracy = mean(s.accuracy for s in scores)
        out[lang.lang] = ReleaseLanguageScore(
            registry.language(lang.lang).name, lang.column, lang.rule, counted,
            [s for s in lang.sources if s not in evaluated],
            [s for s in lang.sources if s in evaluated and s not in lang.counted], accuracy)
    return out


def _minor(per_source: Mapping[str, ReleaseSourceScore], first_correct: List[str], language_table: str):
    registry = load_registry(language_table)
    by_code: Dict[str, List[str]] = {}
    unplaced: List[str] = []
    for name, s in per_source.items():
        if s.tier != "minor" or not s.questions:
            continue
        codes = minor_language_codes(name)
        if not codes:
            unplaced.append(name)
        for code in codes:
            by_code.setdefault(code, []).append(name)

    def name_of(code: str) -> str:
        try:
            return registry.language(code).name
        except LanguageTableError:
            return code

    order = {code: i for i, code in enumerate(registry.codes)}
    out: Dict[str, ReleaseLanguageScore] = {}
    for code in sorted(by_code, key=lambda c: (order.get(c, len(order)), c)):
        sources = by_code[code]
        in_score_json = [s for s in first_correct if s in sources]
        shown = in_score_json[-1] if in_score_json else sources[-1]
        out[code] = ReleaseLanguageScore(name_of(code), shown, "minor", sources, [], [],
                                         per_source[shown].accuracy)
    return out, unplaced


def _dropped_per_source(dropped: List[DroppedQuestion]) -> Dict[str, int]:
    per_source: Dict[str, int] = {}
    for d in dropped:
        per_source[d.source] = per_source.get(d.source, 0) + 1
    return per_source


def _percent(fraction: Optional[float]) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}"


def _columns(rows, left: int, last_left: bool = False) -> List[str]:
    """Rows as aligned text: the first `left` columns (and the last one, if asked) left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = []
        for i, (cell, width) in enumerate(zip(row, widths)):
            leftish = i < left or (last_left and i == len(row) - 1)
            cells.append(cell.ljust(width) if leftish else cell.rjust(width))
        lines.append("  ".join(cells).rstrip())
    return lines
