"""Shared helpers: run `medmoe` as a real process, read its metrics, locate the repository."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

import pytest
import torch

from megatron_medmoe.runtime.quiet import KNOWN_NOISE


def pytest_configure(config):
    for pattern in KNOWN_NOISE:  # megatron-core saying optional GPU libraries are absent
        config.addinivalue_line("filterwarnings", f"ignore:{pattern}")

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny.yaml")  # two stages: cpt (text), sft (chat)
TOKENIZER = str(REPO / "examples" / "tokenizer")
TINY_DATA = {"text": REPO / "runs" / "data" / "tiny_text", "chat": REPO / "runs" / "data" / "tiny_chat"}


@pytest.fixture(scope="session", autouse=True)
def tiny_datasets():
    """The bundled corpora, preprocessed where the tiny recipes expect them (as `make demo` does)."""
    from megatron_medmoe.data.preprocess import PreprocessOptions, run_preprocess

    for fmt, prefix in TINY_DATA.items():
        if not Path(f"{prefix}.json").exists():
            run_preprocess(PreprocessOptions(inputs=[str(REPO / "examples" / "data" / fmt / "*.jsonl")],
                                             tokenizer=TOKENIZER, output_prefix=str(prefix), fmt=fmt), progress=False)
    return TINY_DATA


def cpu_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MEDMOE_LOCAL_WORKER"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_medmoe(args: Sequence[str], timeout: float = 600, check: bool = True, **env) -> subprocess.CompletedProcess:
    """`python -m megatron_medmoe ARGS` in the repository, as a user would run `medmoe ARGS`."""
    proc = subprocess.run([sys.executable, "-m", "megatron_medmoe", *args], cwd=REPO, env=cpu_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"medmoe {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def start_medmoe(args: Sequence[str], preexec_fn=None, **env) -> subprocess.Popen:
    """`medmoe ARGS` started in the background (its output piped)."""
    return subprocess.Popen([sys.executable, "-m", "megatron_medmoe", *args], cwd=REPO, env=cpu_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)


def wait_for_step(proc: subprocess.Popen, metrics_path: Path, step: int, timeout: float = 300) -> None:
    """Until the running `proc` has logged `step` to `metrics_path`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.communicate()}")
        if metrics_path.exists() and any(json.loads(line)["step"] >= step for line in metrics_path.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout}s")


def read_metrics(output_dir, stage: str = "") -> List[dict]:
    """The metrics records of a run (of one stage of a recipe with stages: OUTPUT_DIR/STAGE)."""
    with open(Path(output_dir) / stage / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_stage(stage: str, *args: str) -> List[str]:
    """`medmoe train` arguments for one stage of the tiny recipe."""
    return ["train", TINY, "--stage", stage, *args]


def one_process_reference(root: Path, stage: str, *args: str) -> List[float]:
    """Save the initial weights of a stage of the tiny recipe (ROOT/init/STAGE), then train them in one process
    (ROOT/ref): the losses every layout must reproduce when it loads the same weights."""
    init = root / "init"
    run_medmoe(train_stage(stage, *args, "checkpoint.load=null", "training.train_steps=0", f"checkpoint.save={init}",
                           f"logging.output_dir={init}"))
    run_medmoe(train_stage(stage, *args, f"checkpoint.load={init}/{stage}", "checkpoint.finetune=true",
                           "checkpoint.save=null", f"logging.output_dir={root / 'ref'}"))
    return [r["loss"] for r in read_metrics(root / "ref", stage) if "loss" in r]


def validation_losses(output_dir, stage: str = "") -> List[tuple]:
    """(step, validation loss, per-family validation losses) of each validation a run recorded."""
    return [(r["step"], r["validation"]["loss"], r["validation"]["family_loss"])
            for r in read_metrics(output_dir, stage) if "validation" in r]


def tiny_config(stage: str, overrides=(), world_size=None):
    """The resolved config of one stage of the tiny recipe (paths relative to the repository)."""
    from megatron_medmoe.config import load_stages, resolve_config

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        chosen = next(s for s in load_stages(TINY, overrides) if s.name == stage)
        cfg = resolve_config(chosen.config, world_size=world_size)
        for spec in cfg.data.datasets:
            spec.prefix = os.path.abspath(spec.prefix)
        return cfg
    finally:
        os.chdir(cwd)


def gpu_only(reason: str = "needs an NVIDIA GPU"):
    return pytest.mark.skipif(not torch.cuda.is_available(), reason=f"{reason}; this machine has none")


@pytest.fixture(scope="module")
def megatron_single_rank():
    """megatron-core's parallel state on a one-process gloo group (CPU redirects applied)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_medmoe.runtime import cpu_compat
    from megatron_medmoe.runtime.launch import free_port

    cpu_compat.apply_if_cpu()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(123)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
