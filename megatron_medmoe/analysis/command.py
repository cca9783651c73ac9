"""`medmoe analyze lape | routing`: options in, exit code out (0 done, 2 bad options, 3 bad input).

With --tensor-parallel N the command runs as N ranks: started here as local processes, or joined under
torchrun / srun / mpirun with N ranks."""
from __future__ import annotations

import argparse

from ..inference.ranks import add_model_input_arguments, run_command_as_ranks


def _analysis_arguments(sub: argparse.ArgumentParser) -> None:
    add_model_input_arguments(sub)
    sub.add_argument("--data", action="append", required=True, metavar="LANG=PATH",
                     help="a language's text: JSONL (text or chat records) or .txt (one document per line); repeat")
    sub.add_argument("--output", required=True, metavar="DIR", help="where the tables and figures go")
    sub.add_argument("--seq-length", type=int, help="tokens per row (default: the checkpoint's data.seq_length)")
    sub.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    sub.add_argument("--max-tokens", type=int, help="use at most this many tokens of each language")


def add_analyze_parser(commands) -> None:
    analyze = commands.add_parser("analyze", help="language-specific neurons (LAPE) and routing of a checkpoint",
                                  description="Look inside a checkpoint: LAPE language-specific neurons, routing.")
    tools = analyze.add_subparsers(dest="analysis", required=True, metavar="TOOL")
    lape = tools.add_parser(
        "lape", help="language-specific neurons: selection, counts, perplexity change when switched off",
        description="Count how often every SwiGLU neuron fires per language (MoE layers per expert), select the "
                    "language-specific ones by activation-probability entropy (LAPE), write neurons.json, "
                    "counts.csv and counts.png; with --ppl-matrix also the perplexity change when each "
                    "language's neurons are switched off.")
    _analysis_arguments(lape)
    lape.add_argument("--top-rate", type=float, default=0.01,
                      help="keep this share of all neurons, lowest entropy first (default 0.01)")
    lape.add_argument("--filter-rate", type=float, default=0.95,
                      help="a neuron counts only if some language's activation probability exceeds this quantile "
                           "of all probabilities (default 0.95)")
    lape.add_argument("--activation-bar-ratio", type=float, default=0.95,
                      help="a kept neuron belongs to every language whose probability exceeds this quantile "
                           "(default 0.95)")
    lape.add_argument("--ppl-matrix", action="store_true",
                      help="also measure perplexity per language with each language's neurons deactivated")
    lape.set_defaults(func=_lape)
    routing = tools.add_parser(
        "routing", help="routing ratios per language, layer and expert (eval mode, plain top-k)",
        description="For each language, the MoE layers x experts matrix of routing ratios (rows sum to 1) as "
                    "routing.csv and routing_LANG.png, and the share of tokens whose top-k holds their family "
                    "expert (family_share.csv). Layers are numbered 1 to model.num_layers over the whole model, "
                    "as in the training metrics.")
    _analysis_arguments(routing)
    routing.add_argument("--routing", choices=["topk", "hard"],
                         help="route this way instead of the checkpoint's mode (hard: each token to its family "
                              "expert only)")
    routing.set_defaults(func=_routing)


def _inputs(args) -> dict:
    return dict(ckpt=args.ckpt, data=args.data, output=args.output, tensor=args.tensor_parallel,
                tokenizer=args.tokenizer, seq_length=args.seq_length, batch_size=args.batch_size,
                max_tokens=args.max_tokens)


def _lape(args) -> int:
    from .lape import LapeOptions, run_lape

    opts = LapeOptions(**_inputs(args), top_rate=args.top_rate, filter_rate=args.filter_rate,
                       activation_bar_ratio=args.activation_bar_ratio, ppl_matrix=args.ppl_matrix)
    return run_command_as_ranks(args, lambda env: run_lape(opts, env))


def _routing(args) -> int:
    from .routing import RoutingOptions, run_routing

    opts = RoutingOptions(**_inputs(args), routing=args.routing)
    return run_command_as_ranks(args, lambda env: run_routing(opts, env))
