"""Training that survives anything, in real `medmoe train` processes: a SIGTERM on one rank stops every rank
at the same step and a restart gives bitwise the losses of a run never interrupted (EP 2 and PP 2); a rank
killed while saving leaves the previous checkpoint the latest; a checkpoint saved under TP 2 x EP 2 resumes,
optimizer included, under PP 2 x EP 2; stage 2 of a recipe starts from stage 1's final weights with a fresh
optimizer; keep_last and the wall-clock limit; the dp_reshardable optimizer's layout rule."""
import os
import signal

import psutil
import pytest
import torch

from conftest import REPO, TINY, read_metrics, run_medmoe, start_medmoe, tiny_config, train_stage, wait_for_step
from megatron_medmoe.runtime.exit_codes import EXIT_INPUT, EXIT_REQUEUE
from megatron_medmoe.training.checkpoint import _same_model_layout
from megatron_medmoe.training.optimizer import build_scheduler

FAULTS = str(REPO / "tests" / "faults")
LAYOUTS = {"ep2": ["parallel.expert=2"],
           "pp2": ["parallel.pipeline=2", "parallel.expert=1", "moe.expert_slots=null"]}


def args(tmp_path, *extra, steps=14):
    return train_stage("cpt", f"training.train_steps={steps}", "logging.log_interval=1",
                       f"checkpoint.save={tmp_path / 'ckpt'}", f"logging.output_dir={tmp_path / 'out'}", *extra)


def trajectory(records):
    """What must not change when a run is interrupted: per step, the loss, the loss per family, the gradient norm."""
    return [(r["step"], r["loss"], r["family_loss"], r["grad_norm"]) for r in records]


def worker(proc, rank):
    """The worker process of `rank` that `medmoe train` started."""
    for child in psutil.Process(proc.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigterm_on_one_rank_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, layout):
    ref = tmp_path / "ref"
    run_medmoe(args(ref, *LAYOUTS[layout], "checkpoint.save=null"))
    expected = trajectory(read_metrics(ref / "out", "cpt"))
    assert [s for s, *_ in expected] == list(range(1, 15))

    run = tmp_path / "run"
    proc = start_medmoe(args(run, *LAYOUTS[layout]))
    wait_for_step(proc, run / "out" / "cpt" / "metrics.jsonl", 3)
    worker(proc, 1).send_signal(signal.SIGTERM)  # not rank 0, and not through the launcher
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    stopped = max(r["step"] for r in read_metrics(run / "out", "cpt"))
    assert 3 <= stopped < 14, "the signal came too late to test a resume"
    assert f"stopping after step {stopped} on a stop signal: saved" in out
    assert (run / "ckpt" / "cpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(stopped)

    again = run_medmoe(args(run, *LAYOUTS[layout]))
    assert f"resuming from {run / 'ckpt' / 'cpt'} at step {stopped} (row {stopped * 16})" in again.stdout
    assert trajectory(read_metrics(run / "out", "cpt")) == expected  # bitwise: floats compared exactly


@pytest.mark.multiprocess
def test_a_rank_killed_while_saving_leaves_the_previous_checkpoint_latest(tmp_path):
    ref = tmp_path / "ref"
    run_medmoe(args(ref, "checkpoint.save=null", steps=8))
    expected = trajectory(read_metrics(ref / "out", "cpt"))

    run = tmp_path / "run"
    ckpt = run / "ckpt" / "cpt"
    crashed = run_medmoe(args(run, "checkpoint.save_interval=3", steps=8), check=False,
                         PYTHONPATH=FAULTS, MEDMOE_FAULT="kill_in_save:1:6")
    assert crashed.returncode not in (0, EXIT_REQUEUE), crashed.stdout[-2000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert not (ckpt / "iter_0000006").exists()

    again = run_medmoe(args(run, "checkpoint.save_interval=3", steps=8))
    assert f"resuming from {ckpt} at step 3 (row 48)" in again.stdout
    resumed = trajectory(read_metrics(run / "out", "cpt"))
    assert resumed == expected  # steps 1-8 once each: the crashed run's records after step 3 superseded, bitwise
    assert sorted(os.listdir(ckpt)) == [".medmoe-run.lock", "iter_0000003", "iter_0000006", "iter_0000008",
                                        "latest_checkpointed_iteration.txt"]  # the dead save's partial removed


RESHARD = ["training.global_batch_size=8", "training.micro_batch_size=2", "training.lr_warmup_steps=1",
           "training.lr_decay_steps=6", "moe.expert_slots=8"]  # one schedule, whether a run stops at 3 or 6


@pytest.mark.multiprocess
def test_resume_under_another_layout_with_the_optimizer(tmp_path):
    """From the same initial weights: saved at step 3 under TP 2 x EP 2, resumed under PP 2 x EP 2 with the
    optimizer state, steps 4-6 match a one-process run never stopped."""
    init = tmp_path / "init"
    run_medmoe(args(init, *RESHARD, "parallel.expert=1", steps=0))
    start = ["--load", str(init / "ckpt" / "cpt"), "checkpoint.finetune=true"]  # weights only at step 0
    ref = tmp_path / "ref"
    run_medmoe([*args(ref, *RESHARD, "parallel.expert=1", "checkpoint.save=null", steps=6), *start])
    expected = [r["loss"] for r in read_metrics(ref / "out", "cpt")]

    run = tmp_path / "run"
    run_medmoe([*args(run, *RESHARD, "parallel.tensor=2", "parallel.expert=2", steps=3), *start])
    # Megatron-style shorthands: --load continues from the TP 2 x EP 2 checkpoint, --save goes elsewhere
    again = run_medmoe(train_stage("cpt", "--load", str(run / "ckpt" / "cpt"), "--save", str(tmp_path / "resharded"),
                                   *RESHARD, "parallel.pipeline=2", "parallel.expert=2", "training.train_steps=6",
                                   "logging.log_interval=1", f"logging.output_dir={tmp_path / 'again' / 'out'}"))
    assert f"continuing from {run / 'ckpt' / 'cpt'} at step 3" in again.stdout
    assert (tmp_path / "resharded" / "cpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    losses = [r["loss"] for r in read_metrics(run / "out", "cpt") + read_metrics(tmp_path / "again" / "out", "cpt")]
    assert [r["step"] for r in read_metrics(tmp_path / "again" / "out", "cpt")] == [4, 5, 6]
    assert losses == pytest.approx(expected, rel=1e-6, abs=0)


def model_tensors(checkpoint_dir):
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    return {k: v for k, v in load_plain_tensors(str(checkpoint_dir)).items()
            if k.startswith(("embedding.", "decoder.", "output_layer."))}


def common_state(checkpoint_dir):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(checkpoint_dir))


@pytest.mark.multiprocess
def test_stage_two_starts_from_stage_one_final_weights_with_a_fresh_optimizer(tmp_path, megatron_single_rank):
    # sft runs one step at learning rate 0, so its weights stay what it started from
    recipe = ["stages.cpt.training.train_steps=3", "stages.sft.training.train_steps=1", "stages.sft.training.lr=0",
              "stages.sft.training.min_lr=0", f"checkpoint.save={tmp_path / 'ckpt'}",
              f"logging.output_dir={tmp_path / 'out'}"]
    proc = run_medmoe(["train", TINY, *recipe])
    assert f"initialized the model weights from {tmp_path / 'ckpt' / 'cpt'} (saved at step 3); fresh optimizer" \
        in proc.stdout
    cpt, sft = tmp_path / "ckpt" / "cpt" / "iter_0000003", tmp_path / "ckpt" / "sft" / "iter_0000001"
    before, after = model_tensors(cpt), model_tensors(sft)
    assert before.keys() == after.keys() and len(before) > 10
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert common_state(cpt)["optimizer"]["state"]["common_step"] == 3
    assert common_state(sft)["optimizer"]["state"]["common_step"] == 1  # 4 if cpt's optimizer came along
    assert common_state(sft)["train_state"]["consumed_rows"] == 16  # sft's data from its start

    # run again: both stages are complete and skipped
    again = run_medmoe(["train", TINY, *recipe])
    assert "stage 'cpt' is complete" in again.stdout and "stage 'sft' is complete" in again.stdout


@pytest.mark.multiprocess
def test_keep_last_and_the_wall_clock_limit(tmp_path):
    ckpt = tmp_path / "ckpt" / "cpt"
    stopped = run_medmoe(args(tmp_path, "checkpoint.save_interval=2", "checkpoint.keep_last=2",
                              "training.max_wall_minutes=0.05", steps=300), check=False)
    assert stopped.returncode == EXIT_REQUEUE, stopped.stderr[-3000:]
    step = max(r["step"] for r in read_metrics(tmp_path / "out", "cpt"))
    assert f"stopping after step {step} on the wall-clock limit: saved" in stopped.stdout
    kept = sorted(p for p in os.listdir(ckpt) if p.startswith("iter_"))
    assert len(kept) == 2 and kept[-1] == f"iter_{step:07d}"

    # extended to 2 more steps: the recipe's schedule (decaying over the new length) replaces the checkpoint's
    longer = run_medmoe(args(tmp_path, steps=step + 2))
    assert "the recipe's learning-rate schedule replaces the checkpoint's:" in longer.stdout
    assert f"lr_decay_steps 300 -> {step + 2}" in longer.stdout
    final = read_metrics(tmp_path / "out", "cpt")[-1]
    assert final["step"] == step + 2
    schedule = build_scheduler(_NoOptimizer(), tiny_config("cpt", [f"training.train_steps={step + 2}"]).training)
    schedule.step(step + 1)  # the last update uses the rate after step + 1 scheduler steps
    assert final["lr"] == pytest.approx(schedule.get_lr({}), rel=1e-9)


def reseal(checkpoint_dir):
    """A checkpoint edited on purpose gets a manifest of what it holds now (else it would not verify)."""
    from megatron_medmoe.training.manifest import MANIFEST, checksum_files, write_manifest

    write_manifest(str(checkpoint_dir), checksum_files(str(checkpoint_dir),
                                                       [p.name for p in checkpoint_dir.iterdir() if p.name != MANIFEST]))


class _NoOptimizer:
    param_groups = []


@pytest.mark.multiprocess
def test_dp_reshardable_optimizer_state_names_the_layout_rule(tmp_path):
    """The GPU distributed optimizer's default format only loads under the checkpoint's TP/PP/EP: shown on a CPU
    checkpoint relabelled as one."""
    run_medmoe(args(tmp_path, "parallel.expert=1", "moe.expert_slots=null", steps=1))
    common = tmp_path / "ckpt" / "cpt" / "iter_0000001" / "common.pt"
    state = torch.load(common, weights_only=False)
    state["train_state"]["layout"].update(tensor=2, optimizer="distributed:dp_reshardable")
    torch.save(state, common)
    reseal(common.parent)
    proc = run_medmoe(args(tmp_path, "parallel.expert=1", "moe.expert_slots=null", steps=2), check=False)
    assert proc.returncode == EXIT_INPUT
    assert "saved its optimizer state dp_reshardable under TP 2, PP 1, EP 1, gradient buckets one" in proc.stderr
    assert "checkpoint.optimizer_format=fully_reshardable" in proc.stderr

    # the same sizes but another bucket layout (parallel.overlap_grad_reduce / ddp_bucket_size) does not fit either;
    # checkpoints without the field (CPU, or saved before it existed) had one bucket
    layout = {"tensor": 1, "pipeline": 1, "virtual_pipeline": None, "expert": 1, "expert_tensor": 1}
    assert _same_model_layout(layout, {**layout, "grad_buckets": "one"})
    assert not _same_model_layout({**layout, "grad_buckets": 40_000_000}, {**layout, "grad_buckets": "one"})
    assert not _same_model_layout({**layout, "grad_buckets": 20000}, {**layout, "grad_buckets": 40_000_000})
