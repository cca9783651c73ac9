"""The two evaluation protocols behind one interface, with no model in it: prompts from questions (or from a
prompt file), the answer letter from generated text, and the scores. `medmoe eval mcq` runs a model between
these; training can call them the same way for a dev-set accuracy.

- medmoe (the default): our prompts (prompts.py), our extraction (answers.py), our averaging (scoring.py);
- apollomoe: the release's prompts, extraction and averaging (apollomoe/), to reproduce its numbers.
docs/evaluation.md lists every difference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Mapping, Optional, Sequence

from .questions import Question

if TYPE_CHECKING:
    from .apollomoe.prompts import ReleasePromptSet

PROTOCOLS = ("medmoe", "apollomoe")


@dataclass(frozen=True)
class Decoding:
    """How the answer is generated: greedy, ending at the end-of-text token or after max_new_tokens."""
    max_new_tokens: int
    min_new_tokens: int  # the end-of-text token cannot end the text before this many tokens
    cut_at: Optional[str]  # the text is cut here before extraction (the start of a next chat turn)


DECODING = {
    "medmoe": Decoding(max_new_tokens=32, min_new_tokens=0, cut_at="\nUser:"),
    # src/eval/eval_qwen2.py: GenerationConfig(max_new_tokens=256, min_new_tokens=2, do_sample=False)
    "apollomoe": Decoding(max_new_tokens=256, min_new_tokens=2, cut_at=None),
}


@dataclass(frozen=True)
class McqPrompt:
    qid: str
    source: str
    lang: str
    answer: str  # the correct letter
    letters: str  # the question's option letters
    text: str  # what the model continues


@dataclass
class PreparedMcq:
    protocol: str
    prompts: List[McqPrompt]
    short_sources: List[str] = field(default_factory=list)  # fewer questions than shots + 1: fewer shots
    release: Optional["ReleasePromptSet"] = None  # apollomoe: its drops, and what prompts.json holds


def prepare(protocol: str, questions: Sequence[Question], shots: Optional[int] = None, seed: int = 0,
            eos: str = "<|endoftext|>", loglik: bool = False, limit: Optional[int] = None) -> PreparedMcq:
    """The prompts of `questions` under `protocol`; shots from the whole source, then `limit` per source.

    medmoe: `shots` (default 3) drawn per question with `seed`; `eos` ends each example (the tokenizer's
    end-of-text text); `loglik` ends the prompts where the answer letter is scored. apollomoe: the release's
    templates (its literal <|endoftext|>), `shots` (default the release's 3) drawn with `seed`, questions over its
    budget left out and counted (PromptError: a question its template cannot format)."""
    _check_protocol(protocol)
    if protocol == "apollomoe":
        if loglik:
            raise ValueError("the apollomoe protocol generates its answers (the release has no log-likelihood mode)")
        from .apollomoe.prompts import build_release_prompts

        return _from_release(build_release_prompts(questions, shots, seed).limited(limit))
    from .prompts import build_loglik_prompt, build_prompt, choose_shots

    k = 3 if shots is None else shots
    chosen = choose_shots(questions, k, seed)  # from the whole source, also with a limit
    build = build_loglik_prompt if loglik else build_prompt
    prompts = [McqPrompt(q.qid, q.source, q.lang, q.answer, q.letters, build(q, chosen[q.qid], eos))
               for q in _limited(questions, limit)]
    short = sorted({q.source for q in questions if len(chosen[q.qid]) < k})
    return PreparedMcq(protocol, prompts, short)


def prepare_from_prompt_file(path: str, language_table: str = "families", limit: Optional[int] = None) -> PreparedMcq:
    """apollomoe: prompts already built, by the release's preprocessing or by an earlier `--output`."""
    from .apollomoe.prompts import read_prompt_file

    return _from_release(read_prompt_file(path, language_table).limited(limit))


def extract(protocol: str, text: str, letters: str) -> Optional[str]:
    """The answer letter in generated `text` (already cut at `DECODING[protocol].cut_at`), or None."""
    _check_protocol(protocol)
    if protocol == "apollomoe":
        from .apollomoe.answers import extract_release_answer

        return extract_release_answer(text)
    from .answers import extract_answer

    return extract_answer(text, letters)


def cut(protocol: str, text: str) -> str:
    marker = DECODING[protocol].cut_at
    return text.split(marker)[0] if marker else text


def score_predictions(prepared: PreparedMcq, predictions: Mapping[str, Optional[str]],
                      language_table: str = "families"):
    """Scores (medmoe: scoring.Scores; apollomoe: apollomoe.scoring.ReleaseScores), both with table() and
    to_dict(); `predictions` maps every prompt id to its letter or None."""
    if prepared.protocol == "apollomoe":
        from .apollomoe.scoring import score_release

        return score_release(prepared.release, predictions, language_table)
    from .scoring import score

    return score(prepared.prompts, predictions, language_table)


def _from_release(release: "ReleasePromptSet") -> PreparedMcq:
    prompts = [McqPrompt(p.qid, p.source, p.lang, p.answer, p.letters, p.prompt) for p in release.prompts]
    return PreparedMcq("apollomoe", prompts, list(release.short_sources), release)


def _limited(questions: Sequence[Question], limit: Optional[int]) -> List[Question]:
    if limit is None:
        return list(questions)
    kept, seen = [], {}
    for q in questions:
        seen[q.source] = seen.get(q.source, 0) + 1
        if seen[q.source] <= limit:
            kept.append(q)
    return kept


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
