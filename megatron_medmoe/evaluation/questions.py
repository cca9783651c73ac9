"""Multiple-choice question files and the few-shot prompts built from them.

A question file is JSONL, one question a line (blank lines are skipped):
`{"question": "...", "options": {"A": "...", "B": "..."} or ["...", "..."], "answer": "B",
  "lang": "en", "source": "medExam_en", "id": "..."}`; `lang`, `source` and `id` are optional. A list of
options is lettered A, B, C, ... The source defaults to the file's name without extension; the language
to the source name's second `_` field (`medExam_sw` -> `sw`), and must be in the language table. The id
defaults to `{source}:{line}`. Anything else is an error naming the file and line: no question is dropped.

Prompts follow the ApolloMoE chat format, `User:{question}\\nAssistant:{answer}<|endoftext|>`, with the
few-shot examples (questions of the same source) as earlier turns.
"""
from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from ..data.records import source_language
from ..languages import LanguageRegistry, LanguageTableError, load_registry

OPTION_LETTERS = "ABCDEF"
MIN_OPTIONS, MAX_OPTIONS = 2, len(OPTION_LETTERS)
ANSWER_PREFIX = "The answer is "


class QuestionFileError(ValueError):
    """A question file that cannot be read; the message names the file and line and what is wrong."""


@dataclass(frozen=True)
class Question:
    qid: str
    source: str
    lang: str
    question: str
    options: Tuple[Tuple[str, str], ...]  # (letter, text) in order
    answer: str

    @property
    def letters(self) -> str:
        return "".join(letter for letter, _ in self.options)


def read_questions(paths: Sequence[str], language_table: str = "families") -> List[Question]:
    """Every question of the files, in file and line order; the first problem found raises QuestionFileError."""
    registry = load_registry(language_table)
    questions: List[Question] = []
    seen: Dict[str, str] = {}  # qid -> where it was first read
    for path in paths:
        if not os.path.isfile(path):
            raise QuestionFileError(f"{path}: no such question file")
        default_source = os.path.splitext(os.path.basename(path))[0]
        count = 0
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise QuestionFileError(f"{where}: invalid UTF-8 at byte {e.start}") from None
                if not line.strip():
                    continue
                question = _parse_line(line, number, default_source, registry, where)
                if question.qid in seen:
                    raise QuestionFileError(f"{where}: id {question.qid!r} was already used at {seen[question.qid]}; "
                                            'give every question its own "id"')
                seen[question.qid] = where
                questions.append(question)
                count += 1
        if count == 0:
            raise QuestionFileError(f"{path}: no questions (the file is empty); expected one JSON object a line")
    return questions


def _parse_line(line: str, number: int, default_source: str, registry: LanguageRegistry, where: str) -> Question:
    def fail(message: str) -> NoReturn:
        raise QuestionFileError(f"{where}: {message}")

    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        fail(f"invalid JSON ({e.msg}, column {e.colno})")
    if not isinstance(record, dict):
        fail(f"expected a JSON object, got {type(record).__name__}")

    text = record.get("question")
    if not isinstance(text, str) or not text.strip():
        fail('missing or empty "question" (a non-empty string)')

    options = _options(record.get("options"), fail)
    letters = [letter for letter, _ in options]
    answer = record.get("answer")
    if not isinstance(answer, str) or answer.strip() not in letters:
        fail(f'"answer" must be one of the option letters {", ".join(letters)}, got {answer!r}')

    source = record.get("source", default_source)
    if not isinstance(source, str) or not source:
        fail(f'"source" must be a non-empty string, got {source!r}')
    lang = _language(record, source, registry, fail)

    qid = record.get("id")
    if qid is None:
        qid = f"{source}:{number}"
    elif isinstance(qid, (str, int)) and not isinstance(qid, bool) and str(qid):
        qid = str(qid)
    else:
        fail(f'"id" must be a non-empty string or an integer, got {qid!r}')
    return Question(qid=qid, source=source, lang=lang, question=text.strip(), options=options, answer=answer.strip())


def _options(raw, fail: Callable[[str], NoReturn]) -> Tuple[Tuple[str, str], ...]:
    if isinstance(raw, list):
        if len(raw) > MAX_OPTIONS:
            fail(f'{len(raw)} options; at most {MAX_OPTIONS} (letters {OPTION_LETTERS}) are supported')
        pairs = list(zip(OPTION_LETTERS, raw))
    elif isinstance(raw, dict):
        pairs = list(raw.items())
        expected = list(OPTION_LETTERS[:len(pairs)])
        if len(pairs) <= MAX_OPTIONS and [letter for letter, _ in pairs] != expected:
            fail(f'option letters must be {", ".join(expected)} in that order, got {", ".join(map(str, raw))}')
    else:
        fail('missing "options": an object {"A": "...", "B": "..."} or a list of option texts')
    if len(pairs) < MIN_OPTIONS:
        fail(f"{len(pairs)} option(s); a question needs at least {MIN_OPTIONS}")
    if len(pairs) > MAX_OPTIONS:
        fail(f'{len(pairs)} options; at most {MAX_OPTIONS} (letters {OPTION_LETTERS}) are supported')
    for letter, option in pairs:
        if not isinstance(option, str) or not option.strip():
            fail(f"option {letter} must be a non-empty string, got {option!r}")
    return tuple((letter, option.strip()) for letter, option in pairs)


def _language(record: dict, source: str, registry: LanguageRegistry, fail: Callable[[str], NoReturn]) -> str:
    code: Optional[str] = record.get("lang")
    if code is None:
        code = source_language(source)
        if code is None:
            fail(f'no "lang" field and the source name {source!r} has no language part (like medExam_sw)')
    elif not isinstance(code, str):
        fail(f'"lang" must be a language code string, got {code!r}')
    try:
        return registry.language(code).code  # the table's code: EN and en are one language in the scores
    except LanguageTableError as e:
        fail(str(e))


def format_question(q: Question) -> str:
    """The question text, then one line per option: `A. text`."""
    return q.question + "\n" + "\n".join(f"{letter}. {text}" for letter, text in q.options)


def answer_text(letter: str) -> str:
    return f"{ANSWER_PREFIX}({letter})."


def option_continuation(letter: str) -> str:
    """What follows `build_loglik_prompt` when the model answers `letter`."""
    return f"{letter})."


def choose_shots(questions: Sequence[Question], k: int = 3, seed: int = 0) -> Dict[str, List[Question]]:
    """For each question, k other questions of its source as few-shot examples.

    The draw depends only on the seed, the question and the set of its source's questions (not their order),
    so reordering files or adding another source does not change a question's prompt. A source with k questions or fewer gives each question all the others
    (fewer than k, none for a single question): the lists are shorter, never padded from other sources,
    and the caller reports the shortfall.
    """
    if k < 0:
        raise ValueError(f"k (shots per question) must be 0 or more, got {k}")
    by_source: Dict[str, List[Question]] = defaultdict(list)
    for q in questions:
        by_source[q.source].append(q)
    shots: Dict[str, List[Question]] = {}
    for q in questions:
        others = sorted((other for other in by_source[q.source] if other.qid != q.qid),
                        key=lambda other: other.qid)
        rng = random.Random(f"{seed}:{q.source}:{q.qid}")
        shots[q.qid] = rng.sample(others, min(k, len(others)))
    return shots


def build_prompt(q: Question, shots: Sequence[Question], eos: str = "<|endoftext|>") -> str:
    """The few-shot chat prompt that ends where the model writes its answer to `q`."""
    if any(shot.qid == q.qid for shot in shots):
        raise ValueError(f"question {q.qid!r} is among its own few-shot examples")
    turns = "".join(f"User:{format_question(shot)}\nAssistant:{answer_text(shot.answer)}{eos}\n" for shot in shots)
    return f"{turns}User:{format_question(q)}\nAssistant:"


def build_loglik_prompt(q: Question, shots: Sequence[Question], eos: str = "<|endoftext|>") -> str:
    """The prompt up to the answer letter: the model scores `option_continuation(letter)` after it."""
    return build_prompt(q, shots, eos) + ANSWER_PREFIX + "("
