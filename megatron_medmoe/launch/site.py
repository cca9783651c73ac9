"""What the Slurm site requires, read from the cluster itself: partitions (and the default), whether jobs
must name an account, whether a container image named as a path exists. Checked before anything is
submitted."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional


class SiteError(RuntimeError):
    """The submission cannot work on this cluster; nothing was submitted."""


@dataclass(frozen=True)
class Site:
    partitions: List[str]
    default_partition: Optional[str]
    accounts_enforced: bool
    default_account: Optional[str]


def _run(args: List[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise SiteError(f"`{' '.join(args)}` failed: {said[-1] if said else f'exit {proc.returncode}'}")
    return proc.stdout


def parse_partitions(text: str) -> Dict[str, bool]:
    """`scontrol show partition -o` -> {name: is_default}."""
    found = {}
    for line in text.splitlines():
        name = re.search(r"\bPartitionName=(\S+)", line)
        if name:
            found[name.group(1)] = bool(re.search(r"\bDefault=YES\b", line))
    return found


def accounts_enforced(config_text: str) -> bool:
    """`scontrol show config`: AccountingStorageEnforce with associations (or limits, which imply them)."""
    m = re.search(r"^AccountingStorageEnforce\s*=\s*(\S+)", config_text, re.M)
    return bool(m) and any(word in m.group(1).split(",") for word in ("associations", "limits", "safe", "qos"))


def read_site() -> Site:
    if shutil.which("scontrol") is None:
        raise SiteError("no Slurm client here (scontrol not found): run on a login node, or use --executor local "
                        "or --dry-run")
    partitions = parse_partitions(_run(["scontrol", "show", "partition", "-o"]))
    enforced = accounts_enforced(_run(["scontrol", "show", "config"]))
    default_account = None
    if enforced and shutil.which("sacctmgr"):
        user = os.environ.get("USER") or _run(["id", "-un"]).strip()
        out = subprocess.run(["sacctmgr", "-n", "-P", "show", "user", user, "format=DefaultAccount"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
        default_account = out.splitlines()[0] if out else None
    default = next((name for name, is_default in partitions.items() if is_default), None)
    return Site(sorted(partitions), default, enforced, default_account)


def check_site(site: Site, partition: Optional[str], account: Optional[str]) -> List[str]:
    """Problems with the partition / account choice on this site (empty: fine)."""
    problems = []
    if partition is not None:
        for name in partition.split(","):
            if name not in site.partitions:
                problems.append(f"--partition {name}: this cluster has no such partition (it has: "
                                f"{', '.join(site.partitions) or 'none'})")
    elif site.default_partition is None:
        problems.append(f"--partition is required here: this cluster has no default partition (it has: "
                        f"{', '.join(site.partitions) or 'none'})")
    if account is None and site.accounts_enforced and site.default_account is None:
        problems.append("--account is required here: the cluster enforces accounts "
                        "(AccountingStorageEnforce) and you have no default account")
    return problems


def looks_like_a_path(image: str) -> bool:
    """A container image given as a file (squashfs / SIF) rather than a registry reference."""
    return image.startswith(("/", "./", "../", "~")) or image.endswith((".sqsh", ".squashfs", ".sif"))


def check_image(image: Optional[str]) -> List[str]:
    if image and looks_like_a_path(image) and not os.path.exists(os.path.expanduser(image)):
        return [f"--container-image {image}: no such file (a path names a local image; a registry image looks "
                "like nvcr.io#nvidia/pytorch:25.04-py3)"]
    return []
