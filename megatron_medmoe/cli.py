"""The `medmoe` command: parses arguments and dispatches; the work happens in the packages."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _train(args) -> int:
    from .training.run import run_train

    shorthands = [f"checkpoint.{key}={value}" for key, value in (("load", args.load), ("save", args.save)) if value]
    return run_train(args.config, [*shorthands, *args.overrides], args.stage)


def _split_overrides(parser: argparse.ArgumentParser, args, extras: List[str]) -> None:
    """key=value overrides may follow options (`train RECIPE --stage sft key=value`): argparse leaves those
    to us; anything else it did not recognise is an error."""
    if not extras:
        return
    stray = [x for x in extras if "=" not in x or x.startswith("-")]
    if args.command != "train" or stray:
        parser.error(f"unrecognized arguments: {' '.join(stray or extras)}")
    args.overrides = [*args.overrides, *extras]


def _preprocess(args) -> int:
    from .data.preprocess import PreprocessOptions, preprocess_command

    return preprocess_command(PreprocessOptions(
        inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix, fmt=args.format,
        workers=args.workers, lang=args.lang, lang_field=args.lang_field, source_field=args.source_field,
        text_field=args.text_field, language_table=args.language_table, on_error=args.on_error,
        template=args.chat_template, chunk_bytes=args.chunk_bytes), quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmoe", description="Post-MoE language-family expert models on megatron-core")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train a model from a YAML recipe",
        description="Train from a YAML recipe, stage by stage. Run directly, it starts the worker processes the "
                    "parallel layout needs; under torchrun, srun or mpirun it joins as one rank. A run whose "
                    "checkpoint.save already holds a checkpoint resumes from it. Exit codes: 0 done, 2 bad "
                    "configuration, 3 bad input, 4 non-finite loss, 75 stopped by a signal or the wall clock "
                    "after saving (run again to resume).")
    train.add_argument("config", help="YAML recipe (see examples/)")
    train.add_argument("--stage", metavar="NAME", help="run only this stage of a recipe with stages")
    train.add_argument("--load", metavar="DIR", help="checkpoint.load: continue from this checkpoint (or the latest "
                                                     "complete one in this save directory) when --save holds none")
    train.add_argument("--save", metavar="DIR", help="checkpoint.save: save here, and resume from here when it "
                                                     "already holds a checkpoint")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override a field, e.g. parallel.tensor=2")
    train.set_defaults(func=_train)

    pre = commands.add_parser(
        "preprocess", help="JSONL corpora -> indexed datasets with a language per document",
        description="Tokenize JSONL corpora into megatron-core indexed datasets (.bin/.idx) with a language and "
                    "source per document, a JSON summary and a PNG chart of documents and tokens per language.")
    pre.add_argument("--input", action="append", required=True, metavar="FILE_OR_GLOB",
                     help="JSONL file(s); repeat for more")
    pre.add_argument("--tokenizer", required=True, metavar="DIR", help="a Hugging Face tokenizer directory")
    pre.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin, PREFIX.idx, ...")
    pre.add_argument("--format", choices=["text", "chat"], default="text",
                     help='text: {"text", "lang"} records, loss on all tokens; chat: conversations, loss on answers')
    pre.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    pre.add_argument("--lang", metavar="CODE", help="the language of every record")
    pre.add_argument("--lang-field", default="lang", help="record field holding the language code (default lang)")
    pre.add_argument("--source-field", default="source",
                     help="record field naming the source, e.g. medicalExam_sw: its second _ field is the language "
                          "when there is no language field (default source; else the file name)")
    pre.add_argument("--text-field", default="text", help="record field holding raw text (default text)")
    pre.add_argument("--language-table", default="families", help="families, languages12 or a YAML table path")
    pre.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                     help="fail: stop at the first bad record with file:line; skip: count it by reason and go on")
    pre.add_argument("--chat-template", choices=["apollo", "tokenizer"], default="apollo",
                     help="apollo: User:{q}\\nAssistant:{a}<|endoftext|>; tokenizer: the tokenizer's chat template")
    pre.add_argument("--chunk-bytes", type=int, default=8 << 20,
                     help="input bytes per tokenizing task (default 8 MiB; memory holds a few of them)")
    pre.add_argument("--quiet", action="store_true", help="no progress line and no table")
    pre.set_defaults(func=_preprocess)

    from .convert.command import add_convert_parser

    add_convert_parser(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    from .runtime.quiet import silence_known_noise

    silence_known_noise()
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    _split_overrides(parser, args, extras)
    sys.exit(args.func(args))
