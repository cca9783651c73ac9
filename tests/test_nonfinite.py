"""A non-finite loss or gradient never trains on: the run stops naming the step, rank and micro-batch (exit
code 4), or with training.on_nonfinite=skip skips that step and goes on. The fault is injected into one
micro-batch of one rank of a real `medmoe train` run (tests/faults/sitecustomize.py)."""
import re

import pytest

from conftest import REPO, read_metrics, run_medmoe, train_stage
from megatron_medmoe.runtime.exit_codes import EXIT_NONFINITE

FAULTS = str(REPO / "tests" / "faults")
# the tiny recipe under EP 2: 2 ranks, each 2 micro-batches of 4 rows a step, so a rank's 6th loss (call 5)
# is step 3, micro-batch 1
NAN_ON_RANK_1 = "nan_loss:1:5"


def run(tmp_path, mode, fault):
    return run_medmoe(train_stage("cpt", "training.train_steps=5", "logging.log_interval=1",
                                  f"training.on_nonfinite={mode}", "checkpoint.save_interval=1",
                                  f"checkpoint.save={tmp_path / 'ckpt'}", f"logging.output_dir={tmp_path / 'out'}"),
                      check=False, PYTHONPATH=FAULTS, MEDMOE_FAULT=fault)


@pytest.mark.multiprocess
def test_nan_loss_stops_the_run_naming_step_rank_and_micro_batch(tmp_path):
    proc = run(tmp_path, "stop", NAN_ON_RANK_1)
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-3000:]
    assert ("stopping: non-finite loss at step 3, micro-batch 1 on rank 1 (training.on_nonfinite=stop); "
            "nothing saved from this step") in proc.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "out", "cpt")] == [1, 2]
    assert (tmp_path / "ckpt" / "cpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


@pytest.mark.multiprocess
def test_nan_loss_skips_the_step_when_configured(tmp_path):
    proc = run(tmp_path, "skip", NAN_ON_RANK_1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping step 3: non-finite loss at step 3, micro-batch 1 on rank 1 (training.on_nonfinite=skip)" \
        in proc.stdout
    records = {r["step"]: r for r in read_metrics(tmp_path / "out", "cpt")}
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert records[3]["skipped_steps"] == 1
    assert all(records[s]["skipped_steps"] == 0 and records[s]["loss"] == records[s]["loss"] for s in (1, 2, 4, 5))


@pytest.mark.multiprocess
def test_non_finite_gradient_with_a_finite_loss_stops(tmp_path):
    proc = run(tmp_path, "stop", "inf_grad:0:2")  # rank 0's third loss: step 2, micro-batch 0
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-3000:]
    assert re.search(r"stopping: non-finite gradient norm \((nan|inf)\) at step 2 \(training.on_nonfinite=stop\)",
                     proc.stdout), proc.stdout[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "out", "cpt")] == [1]
