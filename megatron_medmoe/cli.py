"""The `medmoe` command: parses arguments and dispatches; the work happens in the packages."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _train(args) -> int:
    from .training.run import run_train

    return run_train(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmoe", description="Post-MoE language-family expert models on megatron-core")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train a model from a YAML recipe",
        description="Train from a YAML recipe. Run directly, it starts the worker processes the parallel layout "
                    "needs; under torchrun, srun or mpirun it joins as one rank.")
    train.add_argument("config", help="YAML recipe (see examples/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override a field, e.g. parallel.tensor=2")
    train.set_defaults(func=_train)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
