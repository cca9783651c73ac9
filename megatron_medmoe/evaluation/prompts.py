"""Our protocol's few-shot prompts (`--protocol medmoe`, the default): the ApolloMoE chat format,
`User:{question}\\nAssistant:{answer}<|endoftext|>`, with examples of the question's own source as earlier turns.
The release's prompts (`--protocol apollomoe`) are in apollomoe/prompts.py."""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Dict, List, Sequence

from .questions import Question

ANSWER_PREFIX = "The answer is "


def format_question(q: Question) -> str:
    """The context (PubMedQA-style items) on a line of its own, the question, then one line per option: `A. text`."""
    lines = [q.context.strip()] if q.context and q.context.strip() else []
    lines.append(q.question)
    lines.extend(f"{letter}. {text}" for letter, text in q.options)
    return "\n".join(lines)


def answer_text(letter: str) -> str:
    return f"{ANSWER_PREFIX}({letter})."


def option_continuation(letter: str) -> str:
    """What follows `build_loglik_prompt` when the model answers `letter`."""
    return f"{letter})."


def choose_shots(questions: Sequence[Question], k: int = 3, seed: int = 0) -> Dict[str, List[Question]]:
    """For each question, k other questions of its source as few-shot examples.

    The draw depends only on the seed, the question and the set of its source's questions (not their order),
    so reordering files or adding another source does not change a question's prompt. A source with k questions
    or fewer gives each question all the others (fewer than k, none for a single question): the lists are
    shorter, never padded from other sources, and the caller reports the shortfall.
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
