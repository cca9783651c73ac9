"""`medmoe train`: load and validate the recipe, then run its stages in order.

Each stage either starts the worker processes its layout needs (no launcher) or runs in this rank
(torchrun, srun, mpirun). A stage whose save directory already holds its final step is skipped, so the
same command resumes a multi-stage run wherever it stopped. `--stage NAME` runs one stage (a chained
Slurm job per stage).
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

from ..config import ConfigError, Stage, dump_config, load_stages, resolve_config, world_size_of
from ..model.backend import BackendError, check_machine, use_transformer_engine
from ..runtime.env import DistEnv, LaunchEnvError, detect_launch_env
from ..runtime.exit_codes import EXIT_CONFIG, EXIT_INPUT, EXIT_OK
from ..runtime.launch import run_local_workers

# set on the workers `medmoe train` starts itself, whose parent already printed the resolved config
LOCAL_WORKER_ENV = "MEDMOE_LOCAL_WORKER"


def announce(stage: Stage) -> None:
    """Print the resolved config and save it as OUTPUT_DIR/run_config.yaml."""
    cfg = stage.config
    path = os.path.join(cfg.logging.output_dir, "run_config.yaml")
    text = dump_config(cfg, path)
    title = f"stage {stage.name}: " if stage.name else ""
    print(f"{title}resolved config (saved to {path}):\n{text}", flush=True)


def resolve_stages(config_path: str, overrides: Sequence[str], world_size: Optional[int], only: Optional[str],
                   check_files: bool = True) -> List[Stage]:
    """The recipe's stages (or only one), each resolved for `world_size` ranks (None: the layout's own), with
    later stages starting from the previous stage's final weights. Raises ConfigError."""
    stages = load_stages(config_path, overrides)
    if only is not None:
        names = [s.name for s in stages]
        if only not in names:
            raise ConfigError([f"--stage {only!r}: the recipe's stages are {names}"], config_path)
        stages = [s for s in stages if s.name == only]
    resolved = []
    for stage in stages:
        if stage.previous and not stage.weights_from:
            raise ConfigError([f"stage {stage.name!r} starts from stage {stage.previous!r}'s final weights, which "
                               "needs checkpoint.save (or give the stage its own checkpoint.load)"], config_path)
        cfg = resolve_config(stage.config, world_size=world_size, check_files=check_files)
        if stage.weights_from:
            cfg.checkpoint.load, cfg.checkpoint.finetune = stage.weights_from, True
        resolved.append(Stage(stage.name, cfg, stage.previous, stage.weights_from))
    return resolved


def _resolved(config_path: str, overrides: Sequence[str], env: Optional[DistEnv], only: Optional[str]) -> List[Stage]:
    stages = resolve_stages(config_path, overrides, env.world_size if env else None, only)
    for stage in stages:  # what this machine can run (torch only imported when a rule needs it: 2 s a process)
        cfg = stage.config
        check_machine(cfg)
        impl = cfg.model.transformer_impl
        if impl == "transformer_engine" or (impl != "local" and cfg.data.attention == "per_document"):
            if use_transformer_engine(impl) and cfg.data.attention == "per_document":
                raise BackendError("data.attention=per_document is not supported with TransformerEngine layers "
                                   "yet: use model.transformer_impl=local, or data.attention=shared")
        if cfg.training.precision == "bf16":
            import torch

            if not torch.cuda.is_available():
                raise BackendError("training.precision=bf16 needs GPUs; on CPU the model trains in fp32")
    return stages


def _complete(stage: Stage) -> bool:
    from .checkpoint_paths import CheckpointError, latest_iteration

    save = stage.config.checkpoint.save
    try:
        done = latest_iteration(save) if save else None
    except CheckpointError:
        return False
    return done is not None and done >= stage.config.training.train_steps > 0


def run_train(config_path: str, overrides: Sequence[str], only: Optional[str] = None) -> int:
    try:
        env = detect_launch_env()
        stages = _resolved(config_path, overrides, env, only)
    except (ConfigError, LaunchEnvError, BackendError) as e:
        print(f"medmoe train: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    local_worker = os.environ.get(LOCAL_WORKER_ENV) == "1"
    for stage in stages:
        label = f"stage {stage.name!r}" if stage.name else "the run"
        if _complete(stage):
            if not local_worker and (env is None or env.rank == 0):
                print(f"{label} is complete ({stage.config.checkpoint.save} holds step "
                      f"{stage.config.training.train_steps}): skipped", flush=True)
            continue
        if env is None:
            announce(stage)
            world = world_size_of(stage.config)
            print(f"{label}: starting {world} local worker process(es)", flush=True)
            os.environ[LOCAL_WORKER_ENV] = "1"
            argv = ["train", config_path, *(["--stage", stage.name] if stage.name else []), *overrides]
            code = run_local_workers(argv, world)
        else:
            if env.rank == 0 and not local_worker:
                announce(stage)
            code = _train_here(stage, env)
        if code != EXIT_OK:
            return code
    return EXIT_OK


def _train_here(stage: Stage, env: DistEnv) -> int:
    from ..data.dataset import DatasetError
    from ..runtime.cpu_compat import import_megatron_core_deferring_compile
    from ..runtime.quiet import silence_known_noise

    silence_known_noise()
    import_megatron_core_deferring_compile()
    from ..analysis.lens import LensDataError, run_lens
    from ..data.tokenizer import TokenizerError
    from ..languages import LanguageTableError
    from .checkpoint import CheckpointError
    from .loop import train  # heavy imports (megatron-core) only in ranks

    try:
        if stage.config.training.objective == "lens":
            return run_lens(stage.config, env)
        return train(stage.config, env)
    except (DatasetError, CheckpointError, LensDataError, TokenizerError, LanguageTableError) as e:  # bad input: say what and where, no traceback
        print(f"medmoe train [rank {env.rank}]: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT
