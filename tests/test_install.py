"""The environment is the lock: every package the project needs, directly or through another, is installed at
exactly the version pinned by the constraints file `make setup` installed from; the CPU image installs from
the same file, and the GPU image from it too, less what NVIDIA's base image ships."""
import importlib.util
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO
from megatron_medmoe.runtime.cpu_compat import MEGATRON_CORE_VERSION

LOCK = REPO / "constraints.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line.strip())
            assert m, f"{path}: {line!r} is not NAME==VERSION"
            out[canonical(m.group(1))] = m.group(2)
    return out


def makefile_value(name: str) -> str:
    return re.search(rf"^{name} [:?]?= (.+)$", (REPO / "Makefile").read_text(), re.M).group(1).strip()


def needed(name: str, extras=(), seen=None) -> dict:
    """The distributions `name[extras]` needs, transitively, for this interpreter: canonical name -> version."""
    seen = {} if seen is None else seen
    dist = distribution(name)
    seen[canonical(name)] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (*extras, "")):
            continue
        if canonical(req.name) not in seen:
            needed(req.name, tuple(req.extras), seen)
    return seen


def test_the_environment_is_exactly_the_lock_it_was_installed_from():
    record = Path(sys.prefix) / "medmoe-constraints"
    if not record.exists():
        pytest.skip(f"{sys.prefix} was not made by `make setup` (no {record.name}): no lock to compare with")
    used = Path(record.read_text().strip())
    assert used.resolve() == LOCK.resolve(), f"this environment was installed from {used}, not {LOCK}: run make setup"
    locked = pins(used)
    extras = makefile_value("EXTRAS").split(",")
    for name, installed in needed("megatron-medmoe", extras).items():
        if name == "megatron-medmoe":
            continue
        assert name in locked, f"{name} {installed} is installed but not pinned in {used}: run make lock"
        assert Version(installed).public == Version(locked[name]).public, \
            f"{used} pins {name}=={locked[name]}, this environment has {installed}"
    for name in ("setuptools", "wheel"):  # the build tools (no isolated build environment)
        assert distribution(name).version == locked[name]


def test_the_lock_agrees_with_setup_py_and_the_makefile():
    locked = pins(LOCK)
    assert locked["megatron-core"] == MEGATRON_CORE_VERSION
    assert makefile_value("TORCH_SPEC") == f"torch=={locked['torch']}"
    setup_py = (REPO / "setup.py").read_text()
    for name, version in re.findall(r'"([\w.-]+)==([\w.]+)"', setup_py):  # exact pins of setup.py
        assert locked[canonical(name)] == version, name
    with pytest.raises(PackageNotFoundError):  # never the unrelated PyPI package named apex
        distribution("apex")


def test_the_images_install_from_the_lock():
    cpu = (REPO / "docker" / "Dockerfile.cpu").read_text()
    locked = pins(LOCK)
    assert f'"torch=={locked["torch"]}"' in cpu and "-c constraints.txt" in cpu
    assert f'-e ".[{makefile_value("EXTRAS")}]"' in cpu  # what the tests run with
    gpu = (REPO / "docker" / "Dockerfile").read_text()
    assert "gpu_constraints.py constraints.txt > /tmp/constraints-gpu.txt" in gpu
    assert "pip install -c /tmp/constraints-gpu.txt" in gpu


def test_the_gpu_image_keeps_what_its_base_ships():
    spec = importlib.util.spec_from_file_location("gpu_constraints", REPO / "docker" / "gpu_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lock = ["# comment", "megatron-core==0.16.1", "numpy==2.4.6", "torch==2.13.0", "nvidia-dali-cuda130==2.4.0",
            "transformers==5.24.0", "PyYAML==6.0.4"]
    base = ["torch", "numpy", "megatron_core", "pyyaml"]  # what a base image might have installed
    keep, left = module.split_lock(lock, base)
    assert keep == ["megatron-core==0.16.1", "transformers==5.24.0"]
    assert sorted(left) == ["numpy", "nvidia-dali-cuda130", "pyyaml", "torch"]


def test_the_gpu_image_refuses_a_base_megatron_core_cannot_run_on():
    spec = importlib.util.spec_from_file_location("check_gpu_base", REPO / "docker" / "check_gpu_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.problems({"torch": "2.10.0a0+b4e4ee81d3", "transformer_engine": "2.9.0+70f5366"}) == []
    assert module.problems({"torch": "2.5.0a0+e000cf0ad9", "transformer_engine": "1.11.0"}) == [
        "torch 2.5.0a0+e000cf0ad9 is installed, megatron-core 0.16.1 needs >= 2.6",
        "transformer_engine 1.11.0 is installed, megatron-core 0.16.1 needs >= 2.9, < 2.12"]
    assert module.problems({"torch": "2.9.0"}) == ["transformer_engine is not installed (need >= 2.9, < 2.12)"]
    assert "COPY benchmarks benchmarks" in (REPO / "docker" / "Dockerfile").read_text()


def test_the_package_installs_on_the_pythons_megatron_core_supports():
    """megatron-core 0.16.1 runs on 3.10-3.12; GPU machines and NVIDIA's recent images have 3.12."""
    from packaging.specifiers import SpecifierSet

    allowed = SpecifierSet(re.search(r'python_requires="([^"]+)"', (REPO / "setup.py").read_text()).group(1))
    assert all(v in allowed for v in ("3.10", "3.11", "3.12")), allowed
