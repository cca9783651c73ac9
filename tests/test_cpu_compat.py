"""Every CPU redirect still has its target, is still needed, and works: a megatron-core upgrade that breaks
or obsoletes one fails here by name."""
import json
import subprocess
import sys

import megatron.core
import pytest

from conftest import REPO, cpu_env
from megatron_medmoe.runtime import cpu_compat

PROBE = str(REPO / "tests" / "workers" / "cpu_compat_probe.py")
NAMES = [r.name for r in cpu_compat.REDIRECTS]


def probe(*args):
    return subprocess.Popen([sys.executable, PROBE, *args], cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def result(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def outcomes():
    """probe outcomes with all redirects, and for each redirect with all but that one (run concurrently)."""
    running = {"all": probe("all"), **{name: probe("skip", name) for name in NAMES}}
    return {key: result(proc) for key, proc in running.items()}


def test_megatron_core_is_the_pinned_version():
    assert megatron.core.__version__ == cpu_compat.MEGATRON_CORE_VERSION


@pytest.mark.parametrize("name", NAMES)
def test_redirect_targets_exist(name):
    redirect = next(r for r in cpu_compat.REDIRECTS if r.name == name)
    assert not cpu_compat.missing_targets(redirect), f"{name}: megatron-core no longer has what it replaces"


@pytest.mark.parametrize("name", NAMES)
def test_redirect_is_still_needed(outcomes, name):
    without = outcomes[name]
    assert without[name] != "ok", f"{name}: megatron-core works on CPU without it now; remove the redirect"
    if f"source:{name}" in without:
        assert without[f"source:{name}"], f"{name}: megatron-core no longer calls what it redirects"


@pytest.mark.parametrize("name", NAMES)
def test_redirect_works(outcomes, name):
    assert outcomes["all"][name] == "ok"


def test_every_redirect_has_a_probe(outcomes):
    assert set(NAMES) <= set(outcomes["all"])
