"""The `medmoe` command: parses arguments and dispatches; the work happens in the packages."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _train(args) -> int:
    from .training.run import run_train

    shorthands = [f"checkpoint.{key}={value}" for key, value in (("load", args.load), ("save", args.save)) if value]
    shorthands += ["checkpoint.fallback=true"] if args.ckpt_fallback else []
    return run_train(args.config, [*shorthands, *args.overrides], args.stage)


def _split_overrides(parser: argparse.ArgumentParser, args, extras: List[str]) -> None:
    """key=value overrides may follow options (`train RECIPE --stage sft key=value`): argparse leaves those
    to us; anything else it did not recognise is an error."""
    if not extras:
        return
    stray = [x for x in extras if "=" not in x or x.startswith("-")]
    if args.command not in ("train", "submit") or stray:
        parser.error(f"unrecognized arguments: {' '.join(stray or extras)}")
    args.overrides = [*args.overrides, *extras]


def _preprocess(args) -> int:
    from .data.preprocess import PreprocessOptions, preprocess_command

    return preprocess_command(PreprocessOptions(
        inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix, fmt=args.format,
        workers=args.workers, lang=args.lang, lang_field=args.lang_field, source_field=args.source_field,
        text_field=args.text_field, class_field=args.class_field, language_table=args.language_table,
        on_error=args.on_error, template=args.chat_template, chunk_bytes=args.chunk_bytes,
        input_format=args.input_format), quiet=args.quiet)


def _submit(args) -> int:
    from .launch.submit import SubmitOptions, submit_command

    return submit_command(SubmitOptions(
        recipe=args.config, overrides=args.overrides, stages=args.stage, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
        time=args.time, partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
        mail_user=args.mail_user, mail_type=args.mail_type, container_image=args.container_image,
        container_mounts=args.container_mounts, max_requeues=args.max_requeues, signal_seconds=args.signal_seconds,
        folder=args.folder, executor=args.executor, dry_run=args.dry_run))


def _add_submit_parser(commands) -> None:
    sub = commands.add_parser(
        "submit", help="submit a recipe's stages as chained Slurm jobs (submitit)",
        description="Submit a recipe to Slurm through submitit: one job per stage, each starting after the previous "
                    "one succeeded (afterok), one task per GPU. Jobs get SIGUSR1 before their time limit; ranks "
                    "save, stop, and the job requeues itself and resumes exactly (also on preemption). Everything "
                    "is checked before anything is submitted. --executor local runs the stages as local processes.")
    sub.add_argument("config", help="YAML recipe")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help="override a field of every stage")
    sub.add_argument("--stage", action="append", metavar="NAME", help="submit only this stage (repeatable)")
    sub.add_argument("--nodes", type=int, default=1, help="nodes per job (default 1)")
    sub.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8; 0 on CPU nodes)")
    sub.add_argument("--tasks-per-node", type=int, help="ranks per node (default: one per GPU, 1 without GPUs)")
    sub.add_argument("--cpus-per-task", type=int, help="CPU cores per rank")
    sub.add_argument("--time", default="04:00:00", help="time limit per job: minutes or [D-]HH:MM:SS (default 4 h)")
    sub.add_argument("--partition", help="Slurm partition (required where the cluster has no default)")
    sub.add_argument("--account", help="Slurm account (required where the cluster enforces accounts)")
    sub.add_argument("--qos", help="Slurm quality of service")
    sub.add_argument("--constraint", help="Slurm node features, e.g. h100")
    sub.add_argument("--mail-user", help="e-mail address for job notices")
    sub.add_argument("--mail-type", help="e.g. END,FAIL")
    sub.add_argument("--container-image", metavar="IMAGE",
                     help="pyxis/enroot image (registry reference or .sqsh file), or an Apptainer .sif")
    sub.add_argument("--container-mounts", metavar="SRC:DST[,...]", help="mounts into the container")
    sub.add_argument("--max-requeues", type=int, default=10, help="how often a job may requeue itself (default 10)")
    sub.add_argument("--signal-seconds", type=int, default=300,
                     help="SIGUSR1 this many seconds before the time limit (default 300)")
    sub.add_argument("--folder", help="logs and submitit files (default runs/slurm/RECIPE_NAME)")
    sub.add_argument("--executor", choices=["slurm", "local"], default="slurm",
                     help="slurm (default) or local processes on this machine (one job running the stages in order)")
    sub.add_argument("--dry-run", action="store_true", help="print the sbatch scripts; submit nothing")
    sub.set_defaults(func=_submit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmoe", description="Post-MoE language-family expert models on megatron-core")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train a model from a YAML recipe",
        description="Train from a YAML recipe, stage by stage. Run directly, it starts the worker processes the "
                    "parallel layout needs; under torchrun, srun or mpirun it joins as one rank. A run whose "
                    "checkpoint.save already holds a checkpoint resumes from it (after verifying it against its "
                    "manifest). One run at a time per save and output directory. Exit codes: 0 done, 2 bad "
                    "configuration or a directory in use by another run, 3 bad input (a damaged checkpoint, a "
                    "full disk), 4 non-finite loss, 75 stopped by a signal or the wall clock after saving what "
                    "was new (run again to resume).")
    train.add_argument("config", help="YAML recipe (see examples/)")
    train.add_argument("--stage", metavar="NAME", help="run only this stage of a recipe with stages")
    train.add_argument("--load", metavar="DIR", help="checkpoint.load: continue from this checkpoint (or the latest "
                                                     "complete one in this save directory) when --save holds none")
    train.add_argument("--save", metavar="DIR", help="checkpoint.save: save here, and resume from here when it "
                                                     "already holds a checkpoint")
    train.add_argument("--ckpt-fallback", action="store_true",
                       help="checkpoint.fallback: when the latest checkpoint does not verify, load the newest one "
                            "that does (saying so) instead of stopping")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override a field, e.g. parallel.tensor=2")
    train.set_defaults(func=_train)

    pre = commands.add_parser(
        "preprocess", help="corpora (JSONL, JSON arrays, Parquet) -> indexed datasets with a language per document",
        description="Tokenize corpora into megatron-core indexed datasets (.bin/.idx) with a language, source and "
                    "class per document, a JSON summary and a PNG chart of documents and tokens per language. "
                    "Inputs: JSONL (one record per line), a JSON array of records (such as the ApolloMoE release's "
                    "ApolloMoEDataset.json, streamed) or Parquet (as Hugging Face datasets export them), by "
                    "extension or --input-format.")
    pre.add_argument("--input", action="append", required=True, metavar="FILE_OR_GLOB",
                     help="input file(s): .jsonl (or .json-lines, .ndjson, any other extension), .json (one array of "
                          "records), .parquet; repeat for more")
    pre.add_argument("--input-format", choices=["jsonl", "json", "parquet"],
                     help="read every input as this format instead of choosing by extension (e.g. jsonl for JSON Lines "
                          "files named .json)")
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
    pre.add_argument("--class-field", default="class",
                     help="record field holding the record's class, counted per class (the ApolloMoE release: "
                          "major or minor; default class; records without it are unclassified)")
    pre.add_argument("--language-table", default="families", help="families, languages12 or a YAML table path")
    pre.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                     help="fail: stop at the first bad record with file:line (file: item N in a JSON array, file: row N "
                          "in Parquet); skip: count it by reason and go on. A broken JSON array (cut short, not an "
                          "array) always stops")
    pre.add_argument("--chat-template", choices=["apollo", "tokenizer"], default="apollo",
                     help="apollo: User:{q}\\nAssistant:{a}<|endoftext|>; tokenizer: the tokenizer's chat template")
    pre.add_argument("--chunk-bytes", type=int, default=8 << 20,
                     help="input bytes per tokenizing task (default 8 MiB; memory holds a few of them)")
    pre.add_argument("--quiet", action="store_true", help="no progress line and no table")
    pre.set_defaults(func=_preprocess)

    _add_submit_parser(commands)
    from .convert.command import add_convert_parser

    add_convert_parser(commands)
    from .analysis.command import add_analyze_parser
    from .evaluation.command import add_eval_parser

    from .plan.command import add_plan_parser

    add_analyze_parser(commands)
    add_eval_parser(commands)
    add_plan_parser(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    from .runtime.lifeline import watch_lifeline
    from .runtime.quiet import silence_known_noise

    watch_lifeline()  # a worker `medmoe` started itself dies with it
    silence_known_noise()
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what local worker processes are started with
    _split_overrides(parser, args, extras)
    sys.exit(args.func(args))
