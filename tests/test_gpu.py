"""GPU only (skipped with a message on CPU machines): TransformerEngine layers are a drop-in for the local
spec. From one checkpoint, both implementations train to the same losses on one GPU."""
import pytest

from conftest import gpu_only, read_metrics, run_medmoe, train_stage

SINGLE_GPU = ["parallel.expert=1", "moe.expert_slots=null", "training.train_steps=4", "logging.log_interval=1",
              "training.global_batch_size=8", "training.micro_batch_size=2"]


@gpu_only("TransformerEngine layers need an NVIDIA GPU")
def test_transformer_engine_spec_matches_local_spec(tmp_path):
    pytest.importorskip("transformer_engine.pytorch", reason="TransformerEngine is not installed")
    init = tmp_path / "init"
    run_medmoe(train_stage("cpt", *SINGLE_GPU, "training.train_steps=0", "model.transformer_impl=local",
                           f"checkpoint.save={init}", f"logging.output_dir={init}"), CUDA_VISIBLE_DEVICES="0")
    losses = {}
    for impl in ("local", "transformer_engine"):
        out = tmp_path / impl
        run_medmoe(train_stage("cpt", *SINGLE_GPU, f"model.transformer_impl={impl}", f"checkpoint.load={init}/cpt",
                               "checkpoint.finetune=true", "checkpoint.save=null", f"logging.output_dir={out}"),
                   CUDA_VISIBLE_DEVICES="0")
        losses[impl] = [r["loss"] for r in read_metrics(out, "cpt")]
    assert losses["transformer_engine"] == pytest.approx(losses["local"], rel=1e-3)
