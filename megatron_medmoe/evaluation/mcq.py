"""`medmoe eval mcq`: multiple-choice accuracy of a checkpoint, per source, language and major/minor tier.

Two protocols (protocol.py, docs/evaluation.md): ours (`medmoe`, the default) and the ApolloMoE release's
(`apollomoe`), each with its prompts, decoding, answer extraction and averaging. Our protocol has two modes:
- generate: greedy generation (key/value cache) until the end-of-text token or --max-new-tokens, the answer
  letter extracted from the text (answers.py);
- loglik: no generation; the letter whose continuation after "The answer is (" is most likely (one forward
  pass per question, all options in one batch): faster, and always answers.
The release's protocol generates, as the release does: greedy, at least 2 and at most 256 new tokens.
Optionally with a language's LAPE neurons deactivated or activated (steering). Writes, with --output,
predictions.jsonl (one line per question: prompt-free, the generated text and letters), scores.json and, for the
release's protocol, prompts.json (the prompts as the release's preprocessing writes them).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..runtime.env import DistEnv
from ..runtime.exit_codes import EXIT_INPUT, EXIT_OK


class PromptTooLong(ValueError):
    """A prompt (with what is generated or scored after it) longer than the model's positions."""


@dataclass
class SteeringOptions:
    neurons: Optional[str] = None  # neurons.json from `medmoe analyze lape`
    deactivate: List[str] = field(default_factory=list)
    activate: List[str] = field(default_factory=list)


@dataclass
class McqOptions:
    ckpt: str
    data: List[str] = field(default_factory=list)  # question files; or:
    prompts: Optional[str] = None  # apollomoe: prompts already built (the release's or an earlier prompts.json)
    output: Optional[str] = None
    protocol: str = "medmoe"  # or apollomoe
    mode: str = "generate"  # or loglik (medmoe only)
    shots: Optional[int] = None  # None: 3 (the release's number, for both protocols)
    seed: int = 0
    max_new_tokens: Optional[int] = None  # None: the protocol's (32 ours, 256 the release's)
    tensor: int = 1
    tokenizer: Optional[str] = None
    limit: Optional[int] = None  # first N questions of each source
    steering: SteeringOptions = field(default_factory=SteeringOptions)


def steering_context(loaded, opts: SteeringOptions):
    """A context manager switching the chosen languages' neurons off or on (nothing when none is chosen)."""
    import contextlib

    if not opts.deactivate and not opts.activate:
        return contextlib.nullcontext()
    if not opts.neurons:
        raise ValueError("--deactivate / --activate need --steer-neurons NEURONS.json (from medmoe analyze lape)")
    from ..analysis.lape_stats import NeuronSets
    from ..analysis.neurons import Steering, steering_targets

    return Steering(loaded.model, steering_targets(NeuronSets.from_json(opts.neurons), opts.deactivate, opts.activate))


def open_model_and_tokenizer(ckpt: str, tensor: int, tokenizer: Optional[str], env: DistEnv):
    from ..inference.loaded import load_model, model_tokenizer

    loaded = load_model(ckpt, tensor, env)
    return loaded, model_tokenizer(loaded, tokenizer)


def new_token_limit(opts: McqOptions, protocol: str) -> int:
    from .protocol import DECODING

    return DECODING[protocol].max_new_tokens if opts.max_new_tokens is None else opts.max_new_tokens


def answer_all(loaded, tokenizer, prepared, opts: McqOptions) -> Dict[str, Tuple[Optional[str], str]]:
    """{prompt id: (predicted letter or None, output text)} in prompt order."""
    from .protocol import DECODING

    decoding = DECODING[prepared.protocol]
    max_new_tokens = new_token_limit(opts, prepared.protocol)
    encode = lambda text: tokenizer.backend.encode(text, add_special_tokens=False).ids  # noqa: E731
    return {p.qid: _answer(loaded, tokenizer, prepared.protocol, p, opts.mode, max_new_tokens,
                           decoding.min_new_tokens, encode) for p in prepared.prompts}


def _answer(loaded, tokenizer, protocol: str, p, mode: str, max_new_tokens: int, min_new_tokens: int, encode):
    from ..inference.generate import continuation_logprobs, greedy_generate
    from .prompts import option_continuation
    from .protocol import cut, extract

    family = loaded.registry.expert_id(p.lang)
    prompt = encode(p.text)
    conts = [encode(option_continuation(letter)) for letter in p.letters] if mode == "loglik" else []
    needed = len(prompt) + (max(map(len, conts)) if conts else max_new_tokens)
    limit = loaded.cfg.model.max_position_embeddings
    if needed > limit:
        raise PromptTooLong(f"question {p.qid} (source {p.source}): its prompt of {len(prompt)} tokens and "
                            f"{needed - len(prompt)} more exceed the model's {limit} positions")
    if mode == "loglik":
        scores = continuation_logprobs(loaded, prompt, conts, family, tokenizer.end_of_text_id)
        best = max(range(len(scores)), key=lambda i: scores[i])
        return p.letters[best], option_continuation(p.letters[best])
    ids = greedy_generate(loaded, prompt, max_new_tokens, (tokenizer.end_of_text_id,), family,
                          min_new_tokens=min_new_tokens)
    text = cut(protocol, tokenizer.backend.decode(ids))
    return extract(protocol, text, p.letters), text


def run_mcq(opts: McqOptions, env: DistEnv) -> int:
    from ..analysis.inputs import INPUT_ERRORS
    from ..inference.loaded import open_model_config
    from ..inference.ranks import is_rank0
    from .apollomoe.prompts import PromptError
    from .apollomoe.tables import ReleaseTableError
    from .protocol import prepare, prepare_from_prompt_file, score_predictions
    from .questions import QuestionFileError, read_questions

    try:
        # the questions first: a bad file is reported before the model is loaded
        _, cfg = open_model_config(opts.ckpt)
        table = cfg.data.language_table
        if opts.prompts:
            prepared = prepare_from_prompt_file(opts.prompts, table, opts.limit)
        else:
            pool = read_questions(opts.data, table)
            if opts.protocol == "apollomoe":
                prepared = prepare("apollomoe", pool, opts.shots, opts.seed, limit=opts.limit)
        loaded, tokenizer = open_model_and_tokenizer(opts.ckpt, opts.tensor, opts.tokenizer, env)
        if not opts.prompts and opts.protocol == "medmoe":
            eos_text = tokenizer.backend.id_to_token(tokenizer.end_of_text_id)
            prepared = prepare("medmoe", pool, opts.shots, opts.seed, eos_text, opts.mode == "loglik", opts.limit)
        score_predictions(prepared, {p.qid: None for p in prepared.prompts}, table)  # e.g. a source in two languages
        steering = steering_context(loaded, opts.steering)
    except (*INPUT_ERRORS, QuestionFileError, PromptError, ReleaseTableError, ValueError, OSError) as e:
        print(f"medmoe eval mcq: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    shots = 3 if opts.shots is None else opts.shots
    if prepared.short_sources and is_rank0():
        print(f"note: sources with {shots} questions or fewer get fewer shots: {', '.join(prepared.short_sources)}",
              flush=True)
    start = time.perf_counter()
    try:
        with steering:
            answers = answer_all(loaded, tokenizer, prepared, opts)
    except PromptTooLong as e:
        print(f"medmoe eval mcq: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    seconds = time.perf_counter() - start
    scores = score_predictions(prepared, {qid: letter for qid, (letter, _) in answers.items()}, table)
    if is_rank0():
        print(scores.table(), flush=True)
        count = len(prepared.prompts)
        print(f"{count} questions in {seconds:.1f} s ({count / max(seconds, 1e-9):.2f} questions/s, "
              f"{opts.protocol} protocol, {opts.mode})", flush=True)
        if opts.output:
            _write(opts.output, prepared, answers, scores, opts, seconds)
    return EXIT_OK


def _write(output: str, prepared, answers, scores, opts: McqOptions, seconds: float) -> None:
    from .apollomoe.prompts import write_prompt_file
    from .protocol import DECODING

    os.makedirs(output, exist_ok=True)
    written = ["predictions.jsonl", "scores.json"]

    def atomically(name: str, write) -> None:
        tmp = os.path.join(output, f".{name}.tmp")
        write(tmp)
        os.replace(tmp, os.path.join(output, name))

    def predictions(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for item, p in enumerate(prepared.prompts):
                letter, text = answers[p.qid]
                f.write(json.dumps({"item": item, "id": p.qid, "source": p.source, "lang": p.lang,
                                    "answer": p.answer, "predicted": letter, "correct": letter == p.answer,
                                    "output": text}, ensure_ascii=False) + "\n")

    def scores_json(path: str) -> None:
        decoding = DECODING[prepared.protocol]
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**scores.to_dict(), "protocol": prepared.protocol, "mode": opts.mode,
                       "shots": None if opts.prompts else (3 if opts.shots is None else opts.shots),
                       "seed": None if opts.prompts else opts.seed, "prompts": opts.prompts,
                       "max_new_tokens": new_token_limit(opts, prepared.protocol),
                       "min_new_tokens": decoding.min_new_tokens, "checkpoint": opts.ckpt, "seconds": seconds,
                       "steering": vars(opts.steering)}, f, indent=1, ensure_ascii=False)

    atomically("predictions.jsonl", predictions)
    atomically("scores.json", scores_json)
    if prepared.release is not None:
        atomically("prompts.json", lambda path: write_prompt_file(path, prepared.release))
        written.append("prompts.json")
    print(f"wrote {', '.join(f'{output}/{name}' for name in written)}", flush=True)


def run_generate(ckpt: str, prompt: str, max_new_tokens: int, lang: Optional[str], tensor: int,
                 tokenizer: Optional[str], steering: SteeringOptions, env: DistEnv) -> int:
    """`medmoe eval generate`: one prompt, greedy, optionally steered."""
    from ..analysis.inputs import INPUT_ERRORS
    from ..inference.ranks import is_rank0

    try:
        loaded, tok = open_model_and_tokenizer(ckpt, tensor, tokenizer, env)
        family = None if lang is None else loaded.registry.expert_id(lang)
        context = steering_context(loaded, steering)
    except (*INPUT_ERRORS, ValueError, OSError) as e:
        print(f"medmoe eval generate: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    from ..inference.generate import greedy_generate

    with context:
        ids = greedy_generate(loaded, tok.backend.encode(prompt, add_special_tokens=False).ids, max_new_tokens,
                              (tok.end_of_text_id,), family)
    if is_rank0():
        print(tok.backend.decode(ids), flush=True)
    return EXIT_OK
