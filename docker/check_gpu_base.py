"""Does the GPU image's base carry what megatron-core 0.16.1 needs? Run by docker/Dockerfile before anything is
installed; exits 1 naming what is missing or out of range.

    python docker/check_gpu_base.py
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Dict, List

# megatron-core 0.16.1: torch >= 2.6; its dev extra pins transformer-engine >= 2.9, < 2.12 (model/backend.py)
NEEDS = {"torch": ("2.6", None), "transformer_engine": ("2.9", "2.12")}


def problems(installed: Dict[str, str]) -> List[str]:
    from packaging.version import Version

    out = []
    for name, (low, high) in NEEDS.items():
        have = installed.get(name)
        wanted = f">= {low}" + (f", < {high}" if high else "")
        if have is None:
            out.append(f"{name} is not installed (need {wanted})")
            continue
        release = Version(Version(have).base_version)  # NVIDIA's builds: 2.10.0a0+..., 2.9.0+...
        if release < Version(low) or (high and release >= Version(high)):
            out.append(f"{name} {have} is installed, megatron-core 0.16.1 needs {wanted}")
    return out


def main() -> int:
    installed = {}
    for name in NEEDS:
        try:
            installed[name] = version(name)
        except PackageNotFoundError:
            pass
    found = problems(installed)
    for line in found:
        print(f"docker/check_gpu_base.py: {line}: choose another BASE_TAG", file=sys.stderr)
    print("base image: " + ", ".join(f"{k} {v}" for k, v in installed.items()))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
