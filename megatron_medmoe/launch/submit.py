"""`medmoe submit`: a recipe's stages as chained Slurm jobs through submitit (or local processes).

Each stage is one job of NODES x TASKS_PER_NODE ranks (one task per GPU); stage k+1 depends `afterok` on
stage k. Jobs ask Slurm for SIGUSR1 some minutes before their time limit and are requeue-able: ranks save and
stop on SIGUSR1 / SIGTERM, and rank 0 requeues the job (launch/task.py), up to --max-requeues times.
Everything is validated before anything is submitted: the layout against NODES x TASKS_PER_NODE, the
recipe's data files, the partition and account against the cluster, a container image named as a path.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..config import ConfigError
from ..runtime.exit_codes import EXIT_CONFIG, EXIT_OK
from .site import SiteError, check_image, check_site, read_site
from .task import TrainTask

SUBMITIT_COMMAND = "-u -m submitit.core._submit"


@dataclass
class SubmitOptions:
    recipe: str
    overrides: List[str] = field(default_factory=list)
    stages: Optional[List[str]] = None
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: Optional[int] = None  # default: one per GPU (1 without GPUs)
    cpus_per_task: Optional[int] = None
    time: str = "04:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    mail_user: Optional[str] = None
    mail_type: Optional[str] = None
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    max_requeues: int = 10
    signal_seconds: int = 300
    folder: Optional[str] = None
    executor: str = "slurm"
    dry_run: bool = False


def minutes(text: str) -> int:
    """Slurm time (MM, HH:MM:SS, D-HH:MM[:SS]) -> whole minutes (at least 1)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is None and b is None:
        total = a * 60  # minutes
    elif days is None and c is None:
        total = a * 60 + b  # MM:SS
    elif days is None:
        total = a * 3600 + b * 60 + c
    else:
        total = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    return max(1, -(-total // 60))


def tasks_per_node(opts: SubmitOptions) -> int:
    return opts.tasks_per_node or max(opts.gpus_per_node, 1)


def job_name(opts: SubmitOptions, stage: Optional[str]) -> str:
    base = f"medmoe-{Path(opts.recipe).stem}"
    return f"{base}-{stage}" if stage else base


def sbatch_parameters(opts: SubmitOptions, stage: Optional[str], dependency: Optional[str]) -> Dict:
    """submitit SlurmExecutor parameters of one stage's job."""
    params: Dict = dict(job_name=job_name(opts, stage), nodes=opts.nodes, ntasks_per_node=tasks_per_node(opts),
                        time=minutes(opts.time), stderr_to_stdout=True, signal_delay_s=opts.signal_seconds)
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint", "mail_user", "mail_type"):
        if getattr(opts, key) is not None:
            params[key] = getattr(opts, key)
    if opts.gpus_per_node > 0:
        params["gpus_per_node"] = opts.gpus_per_node
    extra = {"signal": f"USR1@{opts.signal_seconds}", "requeue": True}  # our ranks stop on USR1, not USR2
    if dependency:
        extra.update(dependency=f"afterok:{dependency}", kill_on_invalid_dep="yes")
    params["additional_parameters"] = extra
    if opts.container_image and not _apptainer(opts):  # pyxis / enroot; Apptainer runs through python_command
        mounts = [f"--container-mounts={opts.container_mounts}"] if opts.container_mounts else []
        params["srun_args"] = [f"--container-image={opts.container_image}", *mounts,
                               f"--container-workdir={os.getcwd()}"]
    return params


def _apptainer(opts: SubmitOptions) -> bool:
    return bool(opts.container_image) and opts.container_image.endswith(".sif")


def python_command(opts: SubmitOptions) -> str:
    if _apptainer(opts):
        binds = f" --bind {shlex.quote(opts.container_mounts)}" if opts.container_mounts else ""
        return f"apptainer exec --nv{binds} {shlex.quote(opts.container_image)} python"
    if opts.container_image:
        return "python"  # the image's
    return shlex.quote(sys.executable)


def folder_of(opts: SubmitOptions) -> Path:
    return Path(opts.folder or os.path.join("runs", "slurm", Path(opts.recipe).stem)).expanduser().absolute()


def validate(opts: SubmitOptions) -> List[str]:
    """The stages to submit, in order; raises ConfigError / SiteError naming every problem."""
    from ..training.run import resolve_stages

    problems = []
    if opts.nodes < 1:
        problems.append(f"--nodes must be at least 1, got {opts.nodes}")
    if opts.gpus_per_node < 0 or (opts.tasks_per_node is not None and opts.tasks_per_node < 1):
        problems.append("--gpus-per-node must be at least 0 and --tasks-per-node at least 1")
    try:
        minutes(opts.time)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(problems)
    world = opts.nodes * tasks_per_node(opts) if opts.executor == "slurm" else None
    try:
        stages = resolve_stages(opts.recipe, opts.overrides, world, None, check_files=not opts.dry_run)
    except ConfigError as e:
        if world is not None:
            e.args = (f"--nodes {opts.nodes} x {tasks_per_node(opts)} tasks per node = {world} ranks:\n{e}",)
        raise
    names = [s.name for s in stages]
    wanted = opts.stages or names
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise ConfigError([f"--stage {s}: the recipe's stages are {names}" for s in unknown], opts.recipe)
    problems = check_image(opts.container_image)
    if opts.executor == "slurm":
        try:
            problems += check_site(read_site(), opts.partition, opts.account)
        except SiteError as e:
            if not opts.dry_run:
                raise
            print(f"# the cluster was not consulted: {e}", flush=True)
    if problems:
        raise SiteError("\n".join(f"  - {p}" for p in problems))
    return [n for n in names if n in wanted]


def dry_run(opts: SubmitOptions, stages: List[str]) -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    folder = folder_of(opts)
    command = f"{python_command(opts)} {SUBMITIT_COMMAND} {shlex.quote(str(folder / '%j'))}"
    previous = None
    for stage in stages:
        params = sbatch_parameters(opts, stage, f"JOBID_{previous.upper()}" if previous else None)
        print(f"# stage {stage}: `sbatch` this script"
              + (f" after stage {previous} (JOBID_{previous.upper()}: its job id)" if previous else ""))
        print(_make_sbatch_string(command=command, folder=folder / "%j", **params), flush=True)
        previous = stage


def submit(opts: SubmitOptions, stages: List[str]) -> None:
    import submitit

    folder = folder_of(opts)
    recipe = os.path.abspath(opts.recipe)
    if opts.executor == "local":
        executor = submitit.LocalExecutor(folder=folder)  # files named by the job's pid
        executor.update_parameters(timeout_min=minutes(opts.time))
        job = executor.submit(TrainTask(recipe, os.getcwd(), stages, opts.overrides, opts.max_requeues))
        print(f"stages {', '.join(stages)}: local job {job.job_id} (pid), log {job.paths.stdout}, result "
              f"{job.paths.result_pickle}", flush=True)
        return
    previous = None
    for stage in stages:
        executor = submitit.SlurmExecutor(folder=folder / "%j", python=python_command(opts))
        executor.update_parameters(**sbatch_parameters(opts, stage, previous))
        job = executor.submit(TrainTask(recipe, os.getcwd(), [stage], opts.overrides, opts.max_requeues))
        after = f", after job {previous}" if previous else ""
        print(f"stage {stage}: job {job.job_id} ({job_name(opts, stage)}{after}), log "
              f"{str(job.paths.stdout).replace('%t', '0')}", flush=True)
        previous = job.job_id


def submit_command(opts: SubmitOptions) -> int:
    try:
        stages = validate(opts)
    except (ConfigError, SiteError) as e:
        print(f"medmoe submit: nothing submitted:\n{e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if opts.dry_run:
        dry_run(opts, stages)
    else:
        submit(opts, stages)
    return EXIT_OK
