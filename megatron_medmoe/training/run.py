"""`medmoe train`: load and validate the config, then either start local workers or join as a rank."""
from __future__ import annotations

import os
import sys
from typing import Sequence

import torch

from ..config import ConfigError, dump_config, load_config, resolve_config, world_size_of
from ..model.backend import BackendError, use_transformer_engine
from ..runtime.env import LaunchEnvError, detect_launch_env
from ..runtime.launch import run_local_workers

# set on the workers `medmoe train` starts itself, whose parent already printed the resolved config
LOCAL_WORKER_ENV = "MEDMOE_LOCAL_WORKER"
EXIT_CONFIG_ERROR = 2
EXIT_INPUT_ERROR = 3  # data, tokenizer or checkpoint that cannot be used


def announce(cfg) -> None:
    """Print the resolved config and save it as OUTPUT_DIR/run_config.yaml."""
    path = os.path.join(cfg.logging.output_dir, "run_config.yaml")
    text = dump_config(cfg, path)
    print(f"resolved config (saved to {path}):\n{text}", flush=True)


def run_train(config_path: str, overrides: Sequence[str]) -> int:
    try:
        env = detect_launch_env()
        cfg = resolve_config(load_config(config_path, overrides), world_size=env.world_size if env else None)
        if use_transformer_engine(cfg.model.transformer_impl) and cfg.data.attention == "per_document":
            raise BackendError("data.attention=per_document is not supported with TransformerEngine layers yet: "
                               "use model.transformer_impl=local, or data.attention=shared")
        if cfg.training.precision == "bf16" and not torch.cuda.is_available():
            raise BackendError("training.precision=bf16 needs GPUs; on CPU the model trains in fp32")
    except (ConfigError, LaunchEnvError, BackendError) as e:
        print(f"medmoe train: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    if env is None:
        announce(cfg)
        world = world_size_of(cfg)
        print(f"starting {world} local worker process(es)", flush=True)
        os.environ[LOCAL_WORKER_ENV] = "1"
        return run_local_workers(["train", config_path, *overrides], world)
    if env.rank == 0 and os.environ.get(LOCAL_WORKER_ENV) != "1":
        announce(cfg)
    from ..runtime.quiet import silence_known_noise

    silence_known_noise()
    from ..data.dataset import DatasetError
    from .checkpoint import CheckpointError
    from .loop import train  # heavy imports (megatron-core) only in ranks

    try:
        return train(cfg, env)
    except (DatasetError, CheckpointError) as e:  # bad input: say what and where, no traceback
        print(f"medmoe train [rank {env.rank}]: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT_ERROR
