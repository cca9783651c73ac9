"""Family ids reach every router aligned with its tokens: on every pipeline stage, split like the hidden
states under sequence parallelism (TP 2), and, under activation recomputation, a recomputed forward gets
its own micro-batch's ids (spec: "Language ids", the recomputation hazard). Real gloo processes."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, cpu_env

WORKER = str(REPO / "tests" / "workers" / "family_ids_worker.py")
NUM_MICRO = 4


def run_worker(tmp_path, recompute, implementation="channel"):
    out = tmp_path / f"{recompute}-{implementation}"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                           WORKER, str(out), recompute, implementation], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    return {(rep["rank"], int(layer)): calls for rep in reports for layer, calls in rep["layers"].items()}


def orders(calls):
    """(micro-batches seen by forward passes, by recomputed passes), in call order."""
    first = [c["micro_batch"] for c in calls if not c["grad"]]
    recomputed = [c["micro_batch"] for c in calls if c["grad"]]
    return first, recomputed


@pytest.mark.multiprocess
@pytest.mark.parametrize("recompute", ["full", "moe"])
def test_ids_aligned_on_every_stage_and_recomputation(tmp_path, recompute):
    seen = run_worker(tmp_path, recompute)
    # MoE layers 2-4: layer 2 on the first stage, 3 and 4 on the second; both tensor-parallel ranks of each
    assert sorted(seen) == [(0, 2), (1, 2), (2, 3), (2, 4), (3, 3), (3, 4)]
    for where, calls in seen.items():
        assert all(c["micro_batch"] is not None for c in calls), f"misaligned ids at rank/layer {where}: {calls}"
        first, recomputed = orders(calls)
        assert first == list(range(NUM_MICRO)), where
        assert recomputed == list(range(NUM_MICRO)), f"recomputed forwards got other ids at {where}: {recomputed}"


@pytest.mark.multiprocess
def test_the_check_catches_ids_kept_in_a_global(tmp_path):
    """Control: the design the spec warns about fails this check on the first stage."""
    seen = run_worker(tmp_path, "full", "global_variable")
    first, recomputed = orders(seen[(0, 2)])
    assert first == list(range(NUM_MICRO))
    assert recomputed != list(range(NUM_MICRO))
