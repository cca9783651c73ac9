"""The release's test prompts: its per-source templates, 3 examples from the question's own source, its
4,096-character budget; built here from questions, or read as the release's preprocessing wrote them.

Built the way src/prepare/data_process_test_qwen2.py builds them: sources in the order they first appear, their
questions in file order; for each question k+1 questions of its source are drawn, the question itself taken out
if drawn (else the last draw), and the examples are the rest, in draw order. An example is added only while the
prompt stays under the budget (characters, not tokens), and a question whose own prompt is longer than the budget
is left out. Two differences, both stated in docs/evaluation.md: the draw comes from `random.Random(seed)` (the
release's is unseeded, so its prompts change from run to run), and the questions left out are counted and named
(the release drops them without a word). A source with k questions or fewer gives all the others it has (the
release stops with an error).

A prompt file (`--prompts`) is what the release's preprocessing writes and what `--output` writes here
(prompts.json): a JSON array of `{"source_question", "source_option", "question": the prompt, "answer": the
letter, "source"}`, written the way the release writes it, so the two files compare byte for byte.
"""
from __future__ import annotations

import json
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, NoReturn, Optional, Sequence

from ...languages import load_registry
from ..questions import (OPTION_LETTERS, Question, QuestionFileError, language_of, options_from_text, parse_answer,
                         read_json_array)
from .tables import TemplateTable, source_table, template_table


class PromptError(ValueError):
    """Questions the release's templates cannot format; the message names the question and what it lacks."""


@dataclass(frozen=True)
class ReleasePrompt:
    qid: str
    source: str
    lang: str  # our language table's code (the model's routing)
    tier: str  # major | minor: which of the release's result collections counts it
    prompt: str  # the text the model continues
    answer: str  # the correct letter
    letters: str  # the question's option letters ("" when a prompt file does not give its options)
    source_question: str
    source_option: str

    def release_record(self) -> dict:
        """The item as the release's preprocessing writes it."""
        return {"source_question": self.source_question, "source_option": self.source_option,
                "question": self.prompt, "answer": self.answer, "source": self.source}


@dataclass(frozen=True)
class DroppedQuestion:
    qid: str
    source: str
    lang: str
    tier: str
    chars: int  # its own prompt's length, over the budget


@dataclass
class ReleasePromptSet:
    prompts: List[ReleasePrompt]
    dropped: List[DroppedQuestion] = field(default_factory=list)  # over the budget: the release leaves them out
    short_sources: List[str] = field(default_factory=list)  # with fewer questions than shots + 1
    budget_chars: Optional[int] = None  # None: prompts read from a file (built elsewhere)

    def limited(self, limit: Optional[int]) -> "ReleasePromptSet":
        """Only the first `limit` prompts of each source (the drops still counted over all)."""
        if limit is None:
            return self
        seen: Dict[str, int] = {}
        kept = []
        for p in self.prompts:
            seen[p.source] = seen.get(p.source, 0) + 1
            if seen[p.source] <= limit:
                kept.append(p)
        return ReleasePromptSet(kept, self.dropped, self.short_sources, self.budget_chars)


def tier_of(q_tier: Optional[str], source: str) -> str:
    """The release splits its benchmark by `class`; without one, a source of its major table is major."""
    if q_tier is not None:
        return q_tier
    return "major" if source in source_table().language_of else "minor"


def build_release_prompts(questions: Sequence[Question], shots: Optional[int] = None, seed: int = 0,
                          table: Optional[TemplateTable] = None) -> ReleasePromptSet:
    """The release's prompts for `questions` (shots: the release's 3 unless given), examples drawn with `seed`."""
    table = table or template_table()
    k = table.shots if shots is None else shots
    if k < 0:
        raise ValueError(f"shots per question must be 0 or more, got {k}")
    by_source: "OrderedDict[str, List[Question]]" = OrderedDict()
    for q in questions:
        by_source.setdefault(q.source, []).append(q)
    for source, items in by_source.items():
        _check_fields(source, items, table)

    rng = random.Random(seed)
    prompts: List[ReleasePrompt] = []
    dropped: List[DroppedQuestion] = []
    for source, items in by_source.items():
        template = table.template_for(source)
        for q in items:
            drawn = rng.sample(items, min(k + 1, len(items)))
            own = next((i for i, other in enumerate(drawn) if _same(other, q)), None)
            examples = drawn[:own] + drawn[own + 1:] if own is not None else drawn[:-1]
            fields = dict(q.release_fields)
            question = template.question.format(**fields)
            prompt = ""
            for example in examples:
                shot = template.shot.format(**dict(example.release_fields))
                if len(prompt) + len(question) + len(shot) < table.budget_chars:
                    prompt += shot
            prompt += question
            if len(prompt) > table.budget_chars:
                dropped.append(DroppedQuestion(q.qid, q.source, q.lang, tier_of(q.tier, q.source), len(prompt)))
                continue
            prompts.append(ReleasePrompt(q.qid, q.source, q.lang, tier_of(q.tier, q.source), prompt, q.answer,
                                         q.letters, fields["question"], fields["options"]))
    short = [source for source, items in by_source.items() if len(items) <= k]
    return ReleasePromptSet(prompts, dropped, short, table.budget_chars)


def _same(a: Question, b: Question) -> bool:
    """The release finds a question among its draws by comparing whole records (a twin counts as itself)."""
    return (a.record_digest or a.qid) == (b.record_digest or b.qid)


def _check_fields(source: str, items: Sequence[Question], table: TemplateTable) -> None:
    template = table.template_for(source)
    if "context" not in template.fields:
        return
    for q in items:
        if q.context is None:
            listed = "which is the release's template for every source outside its table" if (
                source not in table.sources) else "which the release uses for it"
            raise PromptError(
                f"{q.origin or q.qid}: source {source!r} is formatted with the release's {template.name} template, "
                f"{listed}; it needs a \"context\", and this question has none (the release's "
                "data_process_test_qwen2.py stops here with KeyError: 'context'). Give the question a context, "
                "evaluate with --protocol medmoe, or pass --prompts built by the release's own scripts")


def read_prompt_file(path: str, language_table: str = "families") -> ReleasePromptSet:
    """Prompts as the release's preprocessing (or `--output`) wrote them; a problem raises QuestionFileError."""
    registry = load_registry(language_table)
    prompts: List[ReleasePrompt] = []
    seen: Dict[str, str] = {}
    for where, default_id, record in read_json_array(path):
        def fail(message: str, where=where) -> NoReturn:
            raise QuestionFileError(f"{where}: {message}")

        if not isinstance(record, dict):
            fail("expected a JSON object (a prompt as the release's preprocessing writes it)")
        prompt, source = record.get("question"), record.get("source")
        if not isinstance(prompt, str) or not prompt:
            fail('missing or empty "question" (the prompt, a non-empty string)')
        if not isinstance(source, str) or not source:
            fail(f'"source" must be a non-empty string, got {source!r}')
        options = record.get("source_option")
        if options is None:
            letters = ""
        elif isinstance(options, str):
            letters = "".join(letter for letter, _ in options_from_text(options, fail))
        else:
            fail(f'"source_option" must be the released options string, got {options!r}')
        answer = parse_answer(record.get("answer"), list(letters or OPTION_LETTERS), fail)
        source_question = record.get("source_question", "")
        if not isinstance(source_question, str):
            fail(f'"source_question" must be a string, got {source_question!r}')
        tier = record.get("class")
        if tier is not None and tier not in ("major", "minor"):
            fail(f'"class" must be "major" or "minor", got {tier!r}')
        qid = str(record["id"]) if isinstance(record.get("id"), (str, int)) else default_id(source)
        if qid in seen:
            fail(f"id {qid!r} was already used at {seen[qid]}")
        seen[qid] = where
        lang = language_of(record.get("lang"), source, registry, fail)
        prompts.append(ReleasePrompt(qid, source, lang, tier_of(tier, source), prompt, answer, letters,
                                     source_question, options or ""))
    if not prompts:
        raise QuestionFileError(f"{path}: no prompts (an empty array)")
    return ReleasePromptSet(prompts)


def write_prompt_file(path: str, prompt_set: ReleasePromptSet) -> None:
    """prompts.json as the release's preprocessing writes its test.json (json.dump, ensure_ascii off, indent 2)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump([p.release_record() for p in prompt_set.prompts], f, ensure_ascii=False, indent=2)
