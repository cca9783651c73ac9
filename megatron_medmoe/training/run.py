"""`medmoe train`: load and validate the recipe, then run its stages in order.

Each stage either starts the worker processes its layout needs (no launcher) or runs in this rank
(torchrun, srun, mpirun), holding its save and output directories' locks meanwhile (training/run_lock.py).
A stage whose save directory already holds its final step in a checkpoint that verifies is skipped, so the
same command resumes a multi-stage run wherever it stopped. `--stage NAME` runs one stage (a chained
Slurm job per stage). A stop signal at any point ends the run with EXIT_REQUEUE.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

from ..config import ConfigError, Stage, dump_config, load_stages, resolve_config, world_size_of
from ..model.backend import BackendError, check_machine, use_transformer_engine
from ..runtime.env import DistEnv, LaunchEnvError, detect_launch_env
from ..runtime.exit_codes import EXIT_CONFIG, EXIT_INPUT, EXIT_OK, EXIT_REQUEUE
from ..runtime.launch import run_local_workers
from .checkpoint_paths import CheckpointError
from .manifest import checkpoint_problem, damaged_message
from .run_lock import RunLockError, lock_directories
from .signals import process_stop_request

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
        # GPU-path options (torch imported only for them: 2 s a process). bf16 is that path's precision (the CPU
        # path's optimizer is fp32 only), and the CPU path's optimizer keeps whole weights on every rank: nothing
        # to gather
        gpu_path_only = cfg.training.precision == "bf16" or cfg.parallel.overlap_param_gather
        if gpu_path_only and not _gpu_code_path():
            if cfg.training.precision == "bf16":
                raise BackendError("training.precision=bf16 needs GPUs; on CPU the model trains in fp32")
            raise BackendError("parallel.overlap_param_gather needs the distributed optimizer, which runs on GPUs; "
                               "remove it on CPU")
    return stages


def _gpu_code_path() -> bool:
    from ..runtime.device import gpu_code_path

    return gpu_code_path()


def _complete(stage: Stage, coordinator: bool) -> bool:
    """Whether the stage's save directory holds its final step in a checkpoint that verifies (the coordinator
    checksums it; other ranks compare sizes, enough to agree on every damage but a same-size overwrite, which
    the coordinator's refusal then stops the job for). Raises CheckpointError for a latest checkpoint that is
    unreadable, missing or damaged, unless checkpoint.fallback lets the workers fall back to an earlier one."""
    from .checkpoint_paths import find_checkpoint, latest_iteration

    save = stage.config.checkpoint.save
    try:
        done = latest_iteration(save) if save else None
        if done is None or done < stage.config.training.train_steps or stage.config.training.train_steps <= 0:
            return False
        problem = checkpoint_problem(find_checkpoint(save), checksums=coordinator)
    except CheckpointError as e:
        problem = str(e)
    if problem and stage.config.checkpoint.fallback:
        return False
    if problem:
        raise CheckpointError(damaged_message(problem))
    return True


def run_train(config_path: str, overrides: Sequence[str], only: Optional[str] = None) -> int:
    stop = process_stop_request()  # first: a signal from here on is a stop request, never a crash
    try:
        env = detect_launch_env()
        stages = _resolved(config_path, overrides, env, only)
    except (ConfigError, LaunchEnvError, BackendError) as e:
        print(f"medmoe train: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    local_worker = os.environ.get(LOCAL_WORKER_ENV) == "1"
    # the launcher started directly holds the directories' locks for its workers; under torchrun, srun or mpirun rank 0
    coordinator = env is None or (env.rank == 0 and not local_worker)
    for stage in stages:
        label = f"stage {stage.name!r}" if stage.name else "the run"
        if stop.received:
            if coordinator:
                print(f"stopping before {label} on {stop.received}: run the same command again to resume", flush=True)
            return EXIT_REQUEUE
        try:
            lock = lock_directories([stage.config.checkpoint.save, stage.config.logging.output_dir]) \
                if coordinator else None
        except RunLockError as e:
            print(f"medmoe train: {e}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        try:
            for line in lock.report() if lock else []:
                print(line, flush=True)
            code = _run_stage(stage, label, config_path, overrides, env, local_worker, lock, stop)
        finally:
            if lock is not None:
                lock.release()
        if code != EXIT_OK:
            return code
    if stop.received:  # the stages are done, but whoever asked to stop expects to be told so
        return EXIT_REQUEUE
    return EXIT_OK


def _run_stage(stage: Stage, label: str, config_path: str, overrides: Sequence[str], env: Optional[DistEnv],
               local_worker: bool, lock, stop) -> int:
    try:
        complete = _complete(stage, coordinator=env is None or env.rank == 0)
    except CheckpointError as e:  # a damaged latest checkpoint is never "complete"
        print(f"medmoe train: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    if complete:
        if not local_worker and (env is None or env.rank == 0):
            print(f"{label} is complete ({stage.config.checkpoint.save} holds step "
                  f"{stage.config.training.train_steps}): skipped", flush=True)
        return EXIT_OK
    if env is None:
        announce(stage)
        world = world_size_of(stage.config)
        print(f"{label}: starting {world} local worker process(es)", flush=True)
        os.environ[LOCAL_WORKER_ENV] = "1"
        argv = ["train", config_path, *(["--stage", stage.name] if stage.name else []), *overrides]
        return run_local_workers(argv, world, pass_fds=lock.fds if lock else (), on_signal=stop.handle)
    if env.rank == 0 and not local_worker:
        announce(stage)
    return _train_here(stage, env)


def _train_here(stage: Stage, env: DistEnv) -> int:
    from ..data.dataset import DatasetError
    from ..runtime.cpu_compat import import_megatron_core_deferring_compile
    from ..runtime.quiet import silence_known_noise

    silence_known_noise()
    import_megatron_core_deferring_compile()
    from ..analysis.lens import LensDataError, run_lens
    from ..data.tokenizer import TokenizerError
    from ..evaluation.questions import QuestionFileError
    from ..languages import LanguageTableError
    from .checkpoint import CheckpointError
    from .loop import train  # heavy imports (megatron-core) only in ranks

    try:
        if stage.config.training.objective == "lens":
            return run_lens(stage.config, env)
        return train(stage.config, env)
    except (DatasetError, CheckpointError, LensDataError, TokenizerError, LanguageTableError, QuestionFileError) as e:  # bad input: say what and where, no traceback
        sys.stderr.write(f"medmoe train [rank {env.rank}]: {e}\n")  # one write: ranks share the terminal
        sys.stderr.flush()
        return EXIT_INPUT
    except LaunchEnvError as e:  # the machine cannot hold the layout (more ranks than GPUs)
        sys.stderr.write(f"medmoe train [rank {env.rank}]: {e}\n")
        sys.stderr.flush()
        return EXIT_CONFIG
