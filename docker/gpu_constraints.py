"""Constraints for the GPU image: constraints.txt without the packages NVIDIA's base image already ships.

    python docker/gpu_constraints.py constraints.txt > /tmp/constraints-gpu.txt

The base image's packages (torch, TransformerEngine, apex, numpy and everything NVIDIA built them against)
stay as they are; every other package the project needs is installed at the locked version. Exact pins of
setup.py (megatron-core) are kept even where the base has the package: the code needs that release.
"""
from __future__ import annotations

import re
import sys
from importlib.metadata import distributions
from typing import Iterable, List, Tuple

# torch's CPU wheel and the CUDA 13 build of DALI are what the CPU lock resolved; the image has its own
ALWAYS_FROM_BASE = ("torch", "triton", "nvidia-*")
ALWAYS_LOCKED = ("megatron-core",)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def split_lock(lines: Iterable[str], installed: Iterable[str]) -> Tuple[List[str], List[str]]:
    """(constraint lines to install with, names left to the base image)."""
    have = {canonical(n) for n in installed}
    keep, left = [], []
    for line in lines:
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==\S+$", line.strip())
        if not m:
            continue
        name = canonical(m.group(1))
        if _matches(name, ALWAYS_LOCKED) or not (name in have or _matches(name, ALWAYS_FROM_BASE)):
            keep.append(line.strip())
        else:
            left.append(name)
    return keep, left


def main(argv: List[str]) -> int:
    if len(argv) != 1:
        print("usage: python docker/gpu_constraints.py constraints.txt", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        keep, left = split_lock(f, (d.metadata["Name"] for d in distributions()))
    print("\n".join(keep))
    print(f"left to the base image: {', '.join(sorted(left))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
