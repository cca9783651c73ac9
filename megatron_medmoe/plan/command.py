"""`medmoe plan --recipe RECIPE.yaml --nodes N --gpus-per-node G`: options in, a table (or JSON) out.
Exit codes: 0 printed, 2 bad options or recipe, 3 the token mix cannot be read."""
from __future__ import annotations

import argparse
import json
import re
import sys

from ..runtime.exit_codes import EXIT_CONFIG, EXIT_INPUT, EXIT_OK
from ..runtime.gpus import GPUS
from .memory import GiB

_UNITS = {"": 1e9, "gb": 1e9, "g": 1e9, "gib": GiB, "tb": 1e12, "tib": 1024 * GiB, "mb": 1e6, "mib": 1024 ** 2}


def parse_memory(text: str) -> float:
    """'80GB' (decimal, as GPUs are sold), '80GiB', '141' (GB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 80GB, 80GiB or 141 (GB)")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value


def add_plan_parser(commands) -> None:
    plan = commands.add_parser(
        "plan", help="which TP/PP/EP layouts fit a recipe on N nodes, their memory and communication, expert placement",
        description="Estimate, per GPU, memory (weights, gradients, distributed optimizer state, activations with "
                    "and without recomputation) and communication per step (TP, PP, EP, DP) for every parallel "
                    "layout of the recipe on NODES x GPUS_PER_NODE GPUs; list the layouts that fit, best first, and "
                    "place the family experts on the expert-parallel ranks so that the expected tokens (from the "
                    "recipe's data mix) are balanced. Nothing is started.")
    plan.add_argument("--recipe", required=True, metavar="RECIPE.yaml", help="the training recipe")
    plan.add_argument("--stage", help="the recipe stage whose data mix is used (default: the first)")
    plan.add_argument("--nodes", type=_positive, required=True, help="nodes")
    plan.add_argument("--gpus-per-node", type=_positive, required=True, help="GPUs per node")
    plan.add_argument("--gpu", choices=sorted(GPUS), default="h100",
                      help="the GPU model: its memory, bf16 peak, NVLink bandwidth and whether it has FP8 (default "
                           "h100); the options below override single figures")
    plan.add_argument("--gpu-memory", type=parse_memory,
                      help="memory of one GPU (default: the --gpu's, 80GB for h100; 80GiB, 141GB, ...)")
    plan.add_argument("--peak-tflops", type=float,
                      help="dense bf16 TFLOP/s of one GPU (default: the --gpu's, 989 for h100)")
    plan.add_argument("--efficiency", type=float, default=0.5,
                      help="share of the peak the matrix math reaches, for the step-time estimate (default 0.5)")
    plan.add_argument("--nvlink-gbps", type=float,
                      help="GB/s per GPU inside a node (default: the --gpu's, 360 for h100)")
    plan.add_argument("--network-gbps", type=float, default=45.0, help="GB/s per GPU between nodes (default 45)")
    plan.add_argument("--mix", nargs="+", metavar="NAME=AMOUNT",
                      help="expected tokens per language code or family (e.g. en=1.08e9 zh=7.8e8 ...) instead of "
                           "reading the recipe's datasets")
    plan.add_argument("--top", type=_positive, default=10, help="rows of the table (default 10)")
    plan.add_argument("--json", action="store_true", help="print JSON (every layout) instead of the table")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe field, e.g. fp8.format=e4m3")
    plan.set_defaults(func=_plan)


def _plan(args) -> int:
    from ..config import ConfigError, load_stages
    from ..config.validate import dataset_vocab_size
    from ..languages import LanguageTableError, load_registry
    from ..model.backend import fp8_device_problem, planned_layers
    from .layouts import Machine, plan_layouts
    from .mix import MixError, shares_from_data, shares_from_mix
    from .render import render_table, to_json

    if args.mix:  # `--mix en=1 zh=1 fp8.format=hybrid`: dotted names are recipe overrides, not languages
        overrides = [x for x in args.mix if "." in x.partition("=")[0]]
        args.mix = [x for x in args.mix if x not in overrides]
        args.overrides = [*args.overrides, *overrides]
    try:
        stages = load_stages(args.recipe, args.overrides)
        names = [s.name for s in stages]
        stage = next((s for s in stages if s.name == args.stage), None) if args.stage else stages[0]
        if stage is None:
            raise ConfigError([f"--stage {args.stage!r}: the recipe's stages are {names}"], args.recipe)
        cfg = stage.config
        registry = load_registry(cfg.data.language_table)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = dataset_vocab_size(cfg)
            if cfg.model.vocab_size is None:
                raise ConfigError(["model.vocab_size is null and the recipe's first dataset is not there to say "
                                   "it: set model.vocab_size=N"], args.recipe)
        layers = planned_layers(cfg.model.transformer_impl)[1]  # which layers the memory is planned for, and why
        gpu = GPUS[args.gpu]
        if cfg.fp8.format is not None:
            problem = fp8_device_problem(cfg.fp8.recipe, gpu.name, gpu.capability)
            if problem:
                raise ConfigError([f"fp8.format={cfg.fp8.format}: {problem}"], args.recipe)
        machine = Machine(args.nodes, args.gpus_per_node,
                          args.gpu_memory if args.gpu_memory is not None else gpu.memory_gb * 1e9,
                          args.peak_tflops if args.peak_tflops is not None else gpu.bf16_tflops, args.efficiency,
                          args.nvlink_gbps if args.nvlink_gbps is not None else gpu.nvlink_gbps, args.network_gbps,
                          gpu=gpu.name)
    except (ConfigError, LanguageTableError) as e:
        print(f"medmoe plan: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if cfg.moe.moe_last_n == 0:
            shares, source = [1.0], "dense model"
        elif args.mix:
            shares, source = shares_from_mix(args.mix, registry), "--mix"
        else:
            shares, source = shares_from_data(cfg, registry), "the recipe's datasets"
    except MixError as e:
        print(f"medmoe plan: {e}", file=sys.stderr)
        return EXIT_CONFIG if args.mix else EXIT_INPUT
    candidates = plan_layouts(cfg, machine, registry.num_experts, shares)
    if not candidates:
        print(f"medmoe plan: no parallel layout of {args.recipe} is valid on {machine.world} GPUs "
              f"(global batch {cfg.training.global_batch_size}, {cfg.model.num_layers} layers): change the global "
              "batch or the number of GPUs", file=sys.stderr)
        return EXIT_CONFIG
    context = dict(recipe=args.recipe, stage=stage.name, machine=machine, shares=shares, share_source=source,
                   registry=registry, cfg=cfg, layers=layers)
    if args.json:
        print(json.dumps(to_json(candidates, **context), indent=1))
    else:
        print(render_table(candidates, args.top, **context))
    return EXIT_OK

