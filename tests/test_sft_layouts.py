"""Instruction tuning (chat data, loss on answers, per-document attention) gives the same losses under
every layout from the same initial weights; DALI and the default loader feed the same rows."""
import pytest

from conftest import one_process_reference, read_metrics, run_medmoe, train_stage

STEPS = 4
COMMON = ["training.global_batch_size=8", "training.micro_batch_size=2", "logging.log_interval=1",
          "training.lr_warmup_steps=1", "parallel.expert=1", "data.attention=per_document",
          f"training.train_steps={STEPS}"]
LAYOUTS = {
    "tp2": ["parallel.tensor=2"],
    "pp2-dali": ["parallel.pipeline=2", "data.loader=dali"],
    "ep2": ["parallel.expert=2"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return root, one_process_reference(root, "sft", *COMMON)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sft_same_losses_under_every_layout(reference, name):
    if "dali" in name:
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e .[dali])")
    root, expected = reference
    run_medmoe(train_stage("sft", *COMMON, *LAYOUTS[name], f"checkpoint.load={root / 'init'}/sft",
                           "checkpoint.finetune=true", "checkpoint.save=null", f"logging.output_dir={root / name}"))
    losses = [r["loss"] for r in read_metrics(root / name, "sft")]
    assert losses == pytest.approx(expected, rel=1e-6, abs=0), f"{name}: {losses} vs {expected}"
