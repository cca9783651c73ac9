"""Time to save and to load a full training checkpoint on CPU, for the tiny model and the ApolloMoE 0.5B shape.

    python benchmarks/checkpoint.py [--shapes tiny 0.5b] [--rounds 3] [--dir DIR]

One process (gloo, world size 1), fp32. A checkpoint is what `medmoe train` writes: the model, AdamW's two
moments per weight, the learning-rate schedule, random states and the data position, in megatron-core's
torch_dist format, written aside with its manifest (a size and xxh3-128 checksum per file) and renamed into
place. Loading verifies the manifest, then reads it back into the same model and optimizer (the resume path).
Each round saves a new iteration and loads it, once as before checkpoints had manifests (nothing checksummed
or verified) and once as now, in alternation; the table gives medians and the size on disk. Prints a
markdown table for docs/benchmarks.md.
"""
import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_time import machine, single_rank  # noqa: E402

SHAPES = {  # recipe, stage, overrides for one CPU process in fp32
    "tiny": ("tiny.yaml", "cpt", ["model.vocab_size=1024"]),
    "0.5b": ("apollomoe-0.5b.yaml", "", ["training.precision=fp32", "model.transformer_impl=local"]),
}
ONE_PROCESS = ["parallel.expert=1", "moe.expert_slots=null", "parallel.data=1", "training.micro_batch_size=1",
               "training.global_batch_size=1"]


def build(shape):
    import torch

    from megatron_medmoe.config import load_stages, resolve_config
    from megatron_medmoe.languages import load_registry
    from megatron_medmoe.model.gpt import build_model_chunks
    from megatron_medmoe.training.loop import wrap_ddp
    from megatron_medmoe.training.optimizer import _init_adam_state, build_optimizer, build_scheduler

    recipe, stage, overrides = SHAPES[shape]
    stages = load_stages(os.path.join(ROOT, "examples", recipe), [*overrides, *ONE_PROCESS])
    cfg = resolve_config(next(s.config for s in stages if s.name == stage), world_size=1, check_files=False)
    torch.manual_seed(0)
    models = build_model_chunks(cfg, load_registry(cfg.data.language_table).num_experts)
    model = wrap_ddp(models, cfg, on_gpu=False)
    optimizer = build_optimizer(model, cfg.training, on_gpu=False)
    _init_adam_state(optimizer.optimizer)  # the moments (and step count) a trained run has
    for state in optimizer.optimizer.state.values():
        state["step"] = torch.tensor(1.0)
    return cfg, models, optimizer, build_scheduler(optimizer, cfg.training)


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


class WithoutManifests:
    """The checkpoint path as it was before manifests: nothing checksummed, written or verified."""

    def __init__(self, checkpoint):
        self.checkpoint, self.saved = checkpoint, {}

    def __enter__(self):
        ck = self.checkpoint

        class NoChecksums:
            def __init__(self, *args):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

            def entries(self):
                return {}

            def problem(self):
                return None

        for name, stand_in in (("ChecksumWhileWriting", NoChecksums), ("write_manifest", lambda *a: None),
                               ("_problem_anywhere", lambda *a: None), ("ShardChecksumsMeanwhile", NoChecksums)):
            self.saved[name] = getattr(ck, name)
            setattr(ck, name, stand_in)

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(self.checkpoint, name, original)


def measure(shape, rounds, workdir):
    """Rounds alternate between the path without manifests and the real one (this host's speed drifts)."""
    from megatron_medmoe.training import checkpoint
    from megatron_medmoe.training.checkpoint import TrainState, load_checkpoint, save_checkpoint

    cfg, models, optimizer, scheduler = build(shape)
    params = sum(p.numel() for m in models for p in m.parameters())
    save_dir = os.path.join(workdir, shape)
    times = {"without": ([], []), "with": ([], [])}
    size, iteration = 0, 0
    for _ in range(rounds):
        for variant in ("without", "with"):
            iteration += 1
            with (WithoutManifests(checkpoint) if variant == "without" else contextlib.nullcontext()):
                start = time.perf_counter()
                path = save_checkpoint(save_dir, TrainState(iteration=iteration), models, cfg, optimizer, scheduler)
                times[variant][0].append(time.perf_counter() - start)
                size = dir_bytes(path)
                start = time.perf_counter()
                load_checkpoint(save_dir, models, cfg, optimizer, scheduler)
                times[variant][1].append(time.perf_counter() - start)
            shutil.rmtree(path)  # one checkpoint on disk at a time
    shutil.rmtree(save_dir)
    return params, size, times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    single_rank()
    print(f"Machine: {machine()}\n")
    print("| model | parameters | checkpoint size | manifests | save, s (median; range) | load, s (median; range) |")
    print("|---|---|---|---|---|---|")
    workdir = args.dir or tempfile.mkdtemp(prefix="medmoe-ckpt-")
    fmt = lambda xs: f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"  # noqa: E731
    try:
        for shape in args.shapes:
            params, size, times = measure(shape, args.rounds, workdir)
            for variant, label in (("without", "none (before)"), ("with", "written and verified")):
                saves, loads = times[variant]
                print(f"| {shape} | {params:,} | {size / 2**20:,.0f} MiB | {label} | {fmt(saves)} | {fmt(loads)} |")
            ratio = lambda i: statistics.median(times["with"][i]) / statistics.median(times["without"][i])  # noqa
            print(f"\n{shape}: with manifests, save x{ratio(0):.3f} and load x{ratio(1):.3f} of the time without",
                  flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
