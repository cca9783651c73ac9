"""Accuracy as the ApolloMoE paper reports it: per source, then per language, then per language tier.

A language's accuracy is the unweighted mean of its sources' accuracies, and the major (minor) average
the unweighted mean over the major (minor) languages present, so a large exam weighs no more than a
small one and a language with many questions no more than one with few. A question without an answer
letter (prediction None) counts as wrong and is also counted as unanswered.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import mean
from typing import Dict, List, Mapping, Optional, Protocol, Sequence

from ..languages import load_registry


class Scored(Protocol):
    """What scoring needs of a question or a prompt: questions.Question and protocol.McqPrompt both have it."""
    qid: str
    source: str
    lang: str
    answer: str


@dataclass(frozen=True)
class SourceScore:
    lang: str
    questions: int
    correct: int
    unanswered: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions


@dataclass(frozen=True)
class LanguageScore:
    name: str
    major: bool
    sources: List[str]
    accuracy: float


class SourceTotals:
    """Questions, correct and unanswered summed over `per_source` (both protocols' scores)."""

    @property
    def questions(self) -> int:
        return sum(s.questions for s in self.per_source.values())

    @property
    def correct(self) -> int:
        return sum(s.correct for s in self.per_source.values())

    @property
    def unanswered(self) -> int:
        return sum(s.unanswered for s in self.per_source.values())


@dataclass(frozen=True)
class Scores(SourceTotals):
    per_source: Dict[str, SourceScore]
    per_language: Dict[str, LanguageScore]  # major languages first, each tier in language-table order
    major_average: Optional[float]  # None: no major language present
    minor_average: Optional[float]  # None: no minor language present

    def to_dict(self) -> dict:
        return {
            "per_source": {name: {**asdict(s), "accuracy": s.accuracy} for name, s in self.per_source.items()},
            "per_language": {code: asdict(s) for code, s in self.per_language.items()},
            "major_average": self.major_average,
            "minor_average": self.minor_average,
            "questions": self.questions,
            "correct": self.correct,
            "unanswered": self.unanswered,
        }

    def table(self) -> str:
        """Per language its accuracy and then its sources', then the two averages; percentages."""
        header = ("language", "source", "questions", "correct", "unanswered", "accuracy")
        rows = []
        for code, lang in self.per_language.items():
            tier = "major" if lang.major else "minor"
            rows.append((f"{code} {lang.name} ({tier})", "", "", "", "", _percent(lang.accuracy)))
            for name in lang.sources:
                s = self.per_source[name]
                rows.append(("", name, str(s.questions), str(s.correct), str(s.unanswered), _percent(s.accuracy)))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row) -> str:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:])]
            return "  ".join(cells).rstrip()

        majors = sum(lang.major for lang in self.per_language.values())
        minors = len(self.per_language) - majors
        out = [line(header), *map(line, rows), ""]
        out.append(_average_line("major", majors, self.major_average))
        out.append(_average_line("minor", minors, self.minor_average))
        return "\n".join(out)


def check_predictions(ids: Sequence[str], predictions: Mapping[str, Optional[str]], what: str) -> None:
    """ValueError unless there is exactly one prediction (a letter or None) for each id."""
    known = set(ids)
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} {what}(s), e.g. {missing[:3]}; "
                         f"give None for a {what} whose answer letter was not found")
    unknown = [i for i in predictions if i not in known]
    if unknown:
        raise ValueError(f"predictions for {len(unknown)} id(s) not among the {what}s, e.g. {unknown[:3]}")


def score(questions: Sequence[Scored], predictions: Mapping[str, Optional[str]],
          language_table: str = "families") -> Scores:
    """Score the predicted letters (by question id; None: no letter found) against the answers."""
    check_predictions([q.qid for q in questions], predictions, "question")

    counts: Dict[str, List[int]] = {}  # source -> [questions, correct, unanswered]
    lang_of: Dict[str, str] = {}
    for q in questions:
        if lang_of.setdefault(q.source, q.lang) != q.lang:
            raise ValueError(f"source {q.source!r} has questions in two languages, {lang_of[q.source]!r} and "
                             f"{q.lang!r} (question {q.qid!r}); give each language its own source name")
        c = counts.setdefault(q.source, [0, 0, 0])
        predicted = predictions[q.qid]
        c[0] += 1
        c[1] += int(predicted == q.answer)
        c[2] += int(predicted is None)
    per_source = {name: SourceScore(lang_of[name], *counts[name]) for name in sorted(counts)}

    registry = load_registry(language_table)
    codes = set(lang_of.values())
    for code in codes:
        registry.language(code)  # raises LanguageTableError for a code the table does not know
    present = [lang for lang in registry.languages if lang.code in codes]
    per_language: Dict[str, LanguageScore] = {}
    for lang in sorted(present, key=lambda lang: not lang.is_major):
        sources = [name for name, s in per_source.items() if s.lang == lang.code]
        accuracy = mean(per_source[name].accuracy for name in sources)
        per_language[lang.code] = LanguageScore(lang.name, lang.is_major, sources, accuracy)
    return Scores(per_source, per_language, _tier_average(per_language, major=True),
                  _tier_average(per_language, major=False))


def _tier_average(per_language: Mapping[str, LanguageScore], major: bool) -> Optional[float]:
    accuracies = [lang.accuracy for lang in per_language.values() if lang.major == major]
    return mean(accuracies) if accuracies else None


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def _average_line(tier: str, languages: int, average: Optional[float]) -> str:
    if average is None:
        return f"{tier} average: no {tier} language present"
    return f"{tier} average over {languages} language{'s' if languages != 1 else ''}: {_percent(average)}"
