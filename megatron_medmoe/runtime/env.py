"""Who am I in the job? One function reads rank and world from torchrun, Open MPI / mpi4py or Slurm.

Order of precedence: torchrun-style variables (RANK/WORLD_SIZE, also what `medmoe train` sets for the
workers it starts), then Open MPI (mpirun; across nodes rank 0's address comes through mpi4py), then other
MPI launchers through mpi4py, then Slurm (a task of an srun step; the first node's address, from Slurm when
its name does not resolve). No launcher: None, and `medmoe train` starts the workers itself.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

DEFAULT_PORT = 29500


class LaunchEnvError(RuntimeError):
    """The launcher's environment is incomplete or contradictory."""


@dataclass(frozen=True)
class DistEnv:
    launcher: str  # "torchrun", "mpi" or "slurm"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as e:
        raise LaunchEnvError(f"environment variable {key}={env[key]!r} is not an integer") from e


def first_host(nodelist: str) -> str:
    """The first host name of a Slurm hostlist such as `gpu[003-004,010],login1` or `n1,n2`."""
    m = re.match(r"\s*([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise LaunchEnvError(f"cannot read a host name from the Slurm node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def node_address(name: str) -> str:
    """A Slurm node's address: its name when that resolves, else the NodeAddr Slurm knows it by (e.g. virtual
    nodes sharing one host), else the name."""
    import socket
    import subprocess

    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", name], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return name  # the rendezvous will say it cannot reach it
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else name


def _mpi4py_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


def mpi4py_env(port_override: Optional[int]) -> DistEnv:
    """Ranks from MPI itself (mpi4py); rank 0 shares its address and a free port with the others, so
    `mpirun` needs no MASTER_ADDR even across nodes."""
    import socket

    from .launch import free_port

    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchEnvError("started by an MPI launcher but mpi4py is not installed: pip install mpi4py "
                             "(or export MASTER_ADDR and MASTER_PORT)") from e
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this node (a collective: every rank calls it)
    local_rank, single_node = node.Get_rank(), node.Get_size() == world
    rendezvous = None
    if rank == 0:
        rendezvous = ("127.0.0.1" if single_node else socket.getfqdn(), port_override or free_port())
    addr, port = comm.bcast(rendezvous, root=0)
    return DistEnv("mpi", rank, world, local_rank, addr, port)


def detect_launch_env(environ: Optional[Mapping[str, str]] = None) -> Optional[DistEnv]:
    env = os.environ if environ is None else environ
    port_override = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None

    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise LaunchEnvError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not")
        return DistEnv("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"),
                       _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                       env["MASTER_ADDR"], port_override)

    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE")
        local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else world
        addr = env.get("MASTER_ADDR")
        if addr is None:
            if local_size != world:
                if environ is not None or not _mpi4py_available():
                    raise LaunchEnvError(
                        "mpirun across several nodes needs the rendezvous host: pip install mpi4py (rank 0 then "
                        "shares it), or export MASTER_ADDR=<first node> and pass it with `mpirun -x MASTER_ADDR`")
                return mpi4py_env(port_override)
            addr = "127.0.0.1"
        return DistEnv("mpi", _int(env, "OMPI_COMM_WORLD_RANK"), world,
                       _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0,
                       addr, port_override or DEFAULT_PORT)

    # other MPI launchers (MPICH / Intel MPI hydra, PMIx) outside an srun step: ask MPI itself
    if environ is None and any(k in env for k in ("PMI_SIZE", "PMIX_RANK")) and "SLURM_STEP_ID" not in env:
        return mpi4py_env(port_override)

    # Slurm: only a task of an srun step is a rank; the batch script itself is not.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        ntasks_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        if ntasks_key not in env:
            raise LaunchEnvError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (node_address(first_host(nodelist)) if nodelist else None)
        if addr is None:
            raise LaunchEnvError("no MASTER_ADDR and no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST to take it from")
        job = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        return DistEnv("slurm", _int(env, "SLURM_PROCID"), _int(env, ntasks_key),
                       _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                       addr, port_override or (20000 + job % 20000))
    return None
