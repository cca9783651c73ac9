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
    """probe outcomes with all redirects, and for each redirect with all but that one (forked concurrently)."""
    return result(probe("each", "all", *NAMES))


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


IMPORT_PROBE = """
import sys, json, torch
from megatron_medmoe.runtime.cpu_compat import import_megatron_core_deferring_compile
if sys.argv[1] == "deferred":
    import_megatron_core_deferring_compile()
import megatron.core.jit as jit
from megatron.core.fusions import fused_bias_swiglu
a, b = torch.randn(3, 4), torch.randn(3, 4)
print(json.dumps({"inductor_loaded": "torch._inductor.compile_fx" in sys.modules,
                  "jit_fuser_is_compile": jit.jit_fuser is torch.compile,
                  "deferred": getattr(fused_bias_swiglu.swiglu, "deferred_compile", False),
                  "compile_restored": torch.compile.__module__ == "torch"}))
"""


def test_deferring_megatron_cores_import_time_compile_still_pays_off():
    """megatron-core still decorates its fusions with torch.compile at import (which loads TorchInductor); with
    the deferral it does not, the functions are the deferred wrappers, and torch.compile is restored after."""
    seen = {}
    for mode in ("plain", "deferred"):
        proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE, mode], cwd=REPO, env=cpu_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        seen[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["plain"]["jit_fuser_is_compile"] and seen["plain"]["inductor_loaded"], seen["plain"]
    assert not seen["plain"]["deferred"]
    assert not seen["deferred"]["inductor_loaded"] and seen["deferred"]["deferred"], seen["deferred"]
    assert seen["deferred"]["compile_restored"]


def test_a_deferred_function_compiles_on_its_first_call_and_computes_the_same():
    calls = []

    def fake_compile(fn, **options):
        calls.append(options)
        return lambda *a: fn(*a)

    wrapped = cpu_compat._deferred_compile(fake_compile)(backend="eager")(lambda x: x + 1)
    assert calls == []  # decorating compiles nothing
    assert wrapped(1) == 2 and wrapped(2) == 3
    assert calls == [{"backend": "eager"}]  # compiled once, on the first call
