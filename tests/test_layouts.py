"""Layout equivalence: from the same initial weights (one checkpoint, loaded under each layout) the loss
of several training steps, and the validation loss (overall and per family) after steps 2 and 4, are equal in
fp32, within 1e-6 relative, for TP, EP (both token dispatchers), PP, interleaved PP, combined 4-process
layouts, gradients reduced during the backward pass, and other expert slot counts and placements. Every run is
`medmoe train` in real processes."""
import pytest

from conftest import TINY_DATA, one_process_reference, read_metrics, run_medmoe, train_stage, validation_losses

STEPS = 4
COMMON = ["training.global_batch_size=8", "training.micro_batch_size=2", "logging.log_interval=1",
          "training.lr_warmup_steps=1", "moe.expert_slots=8", "parallel.expert=1", f"training.train_steps={STEPS}",
          f"data.validation=[{{prefix: {TINY_DATA['chat']}}}]", "training.eval_interval=2", "training.eval_iters=1"]

LAYOUTS = {
    "tp2": ["parallel.tensor=2"],
    "ep2-alltoall": ["parallel.expert=2", "moe.token_dispatcher=alltoall"],
    "ep2-allgather": ["parallel.expert=2", "moe.token_dispatcher=allgather"],
    "pp2": ["parallel.pipeline=2"],
    "pp2-interleaved": ["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
    "tp2xep2": ["parallel.tensor=2", "parallel.expert=2"],
    "pp2xep2": ["parallel.pipeline=2", "parallel.expert=2"],
    # gradients reduced bucket by bucket during the backward pass, each model chunk's started by the schedule
    "pp2-interleaved-xep2-overlap": ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "parallel.expert=2",
                                     "parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=20000"],
    # checkpoints are keyed by expert: 7 slots load the 8-slot checkpoint; a shuffled placement trains the same
    "ep1-7-slots": ["moe.expert_slots=null"],
    "ep2-placement": ["parallel.expert=2", "moe.expert_placement=[3,6,0,7,1,4,2]"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return root, one_process_reference(root, "cpt", *COMMON)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_same_losses_as_one_process(reference, name):
    root, expected = reference
    assert len(expected) == STEPS and expected[-1] < expected[0]
    out = root / name
    proc = run_medmoe(train_stage("cpt", *COMMON, *LAYOUTS[name], f"checkpoint.load={root / 'init'}/cpt",
                                  "checkpoint.finetune=true", "checkpoint.save=null", f"logging.output_dir={out}"))
    if "overlap" in name:
        buckets = int(proc.stdout.split("gradients reduced in ")[1].split()[0])
        assert buckets > 1, proc.stdout
    losses = [r["loss"] for r in read_metrics(out, "cpt") if "loss" in r]
    assert losses == pytest.approx(expected, rel=1e-6, abs=0), f"{name}: {losses} vs {expected}"
    validated, reference_validation = validation_losses(out, "cpt"), validation_losses(root / "ref", "cpt")
    assert [step for step, _, _ in reference_validation] == [2, 4]
    for (step, loss, families), (_, want, want_families) in zip(validated, reference_validation, strict=True):
        assert loss == pytest.approx(want, rel=1e-6, abs=0), f"{name}: validation at step {step}"
        assert families == pytest.approx(want_families, rel=1e-6, abs=0), f"{name}: validation at step {step}"
