"""`medmoe eval mcq | generate`: options in, exit code out (0 done, 2 bad options, 3 bad input)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..inference.ranks import add_model_input_arguments, run_command_as_ranks
from ..runtime.exit_codes import EXIT_CONFIG


def _steering_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--steer-neurons", metavar="NEURONS_JSON",
                     help="language-specific neurons from `medmoe analyze lape` (for --deactivate / --activate)")
    sub.add_argument("--deactivate", action="append", default=[], metavar="LANG",
                     help="switch this language's neurons off (silu(gate) = 0); repeatable")
    sub.add_argument("--activate", action="append", default=[], metavar="LANG",
                     help="hold this language's neurons at their mean activation on its corpus; repeatable")


def add_eval_parser(commands) -> None:
    ev = commands.add_parser("eval", help="multiple-choice medical exams; steered generation",
                             description="Evaluate a checkpoint.")
    tools = ev.add_subparsers(dest="evaluation", required=True, metavar="TOOL")
    mcq = tools.add_parser(
        "mcq", help="accuracy on multiple-choice questions per source, language, major/minor average",
        description="3-shot multiple-choice evaluation (examples from the question's own source, ApolloMoE chat "
                    "format). --protocol medmoe (default): our prompts, answer extraction and averaging; generate: "
                    "greedy generation with a key/value cache, the answer letter extracted by regex; loglik: the most "
                    "likely answer letter, no generation (faster). --protocol apollomoe: the ApolloMoE release's "
                    "prompts, decoding, extraction and averaging, to put a number next to the paper's. Prints "
                    "accuracy per source and language and the major / minor language averages (docs/evaluation.md).")
    add_model_input_arguments(mcq)
    mcq.add_argument("--data", nargs="+", default=[], metavar="FILE",
                     help="question files: JSONL, or a JSON array (.json) like the released ApolloMoEBench.json "
                          "(docs/evaluation.md)")
    mcq.add_argument("--protocol", choices=["medmoe", "apollomoe"], default="medmoe",
                     help="medmoe (default): ours; apollomoe: the release's evaluation")
    mcq.add_argument("--prompts", metavar="JSON",
                     help="apollomoe, instead of --data: prompts already built, by the release's "
                          "data_process_test_qwen2.py or as an earlier --output's prompts.json")
    mcq.add_argument("--mode", choices=["generate", "loglik"], default="generate",
                     help="default generate; loglik is ours only")
    mcq.add_argument("--shots", type=int, metavar="K", help="few-shot examples from the same source (default 3)")
    mcq.add_argument("--seed", type=int, metavar="N", help="which questions serve as shots (default 0)")
    mcq.add_argument("--max-new-tokens", type=int, metavar="N",
                     help="generate: at most this many (default 32; apollomoe: the release's 256)")
    mcq.add_argument("--limit", type=int, metavar="N", help="only the first N questions of each source")
    mcq.add_argument("--output", metavar="DIR",
                     help="write predictions.jsonl and scores.json here (apollomoe: also prompts.json)")
    _steering_arguments(mcq)
    mcq.set_defaults(func=_mcq)
    gen = tools.add_parser("generate", help="greedy continuation of one prompt, optionally with neurons steered",
                           description="Greedy generation (key/value cache) from one prompt; with --steer-neurons "
                                       "and --deactivate/--activate, language-specific neurons switched off or on.")
    add_model_input_arguments(gen)
    gen.add_argument("--prompt", required=True, help='e.g. "User:What helps against a fever?\\nAssistant:"')
    gen.add_argument("--lang", help="the prompt's language (its family id; needed only by hard routing)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    _steering_arguments(gen)
    gen.set_defaults(func=_generate)


def _steering(args):
    from .mcq import SteeringOptions

    return SteeringOptions(args.steer_neurons, args.deactivate, args.activate)


def _mcq_option_problem(args) -> Optional[str]:
    if bool(args.data) == bool(args.prompts):
        return "give question files (--data) or, with --protocol apollomoe, prompts already built (--prompts)"
    if args.prompts and args.protocol != "apollomoe":
        return "--prompts takes the release's prompts: add --protocol apollomoe"
    if args.prompts and (args.shots is not None or args.seed is not None):
        return "--shots and --seed choose the examples of prompts built here; --prompts are built already"
    if args.protocol == "apollomoe" and args.mode == "loglik":
        return "--mode loglik is ours: the release's protocol generates its answers"
    for name in ("shots", "limit", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "shots" else 1):
            return f"--{name.replace('_', '-')} must be {'0' if name == 'shots' else '1'} or more, got {value}"
    return None


def _mcq(args) -> int:
    from .mcq import McqOptions, run_mcq

    problem = _mcq_option_problem(args)
    if problem:
        print(f"medmoe eval mcq: {problem}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    opts = McqOptions(ckpt=args.ckpt, data=args.data, prompts=args.prompts, output=args.output,
                      protocol=args.protocol, mode=args.mode, shots=args.shots,
                      seed=0 if args.seed is None else args.seed, max_new_tokens=args.max_new_tokens,
                      tensor=args.tensor_parallel, tokenizer=args.tokenizer, limit=args.limit,
                      steering=_steering(args))
    return run_command_as_ranks(args, lambda env: run_mcq(opts, env))


def _generate(args) -> int:
    from .mcq import run_generate

    prompt = args.prompt.replace("\\n", "\n")
    return run_command_as_ranks(args, lambda env: run_generate(args.ckpt, prompt, args.max_new_tokens, args.lang,
                                                   args.tensor_parallel, args.tokenizer, _steering(args), env))
