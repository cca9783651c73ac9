"""GPU only (skipped with a message on CPU machines): TransformerEngine layers are a drop-in for the local
spec (from one checkpoint, both train to the same losses on one GPU); FP8 trains to bf16's loss; the
planner's memory estimate matches the measured peak."""
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


@gpu_only("FP8 TransformerEngine layers need an NVIDIA GPU")
def test_fp8_trains_close_to_bf16(tmp_path):
    pytest.importorskip("transformer_engine.pytorch", reason="TransformerEngine is not installed")
    losses = {}
    for name, extra in (("bf16", []), ("fp8", ["fp8.format=hybrid", "fp8.recipe=tensorwise"])):
        out = tmp_path / name
        run_medmoe(train_stage("cpt", *SINGLE_GPU, "training.precision=bf16", "training.train_steps=40",
                               "checkpoint.save=null", f"logging.output_dir={out}", *extra), CUDA_VISIBLE_DEVICES="0")
        losses[name] = [r["loss"] for r in read_metrics(out, "cpt")]
    assert losses["fp8"][-1] == pytest.approx(losses["bf16"][-1], rel=0.02)
    assert losses["fp8"][-1] < losses["fp8"][0] - 1.0


@gpu_only("the planner's memory estimate is checked against a GPU's measured peak")
def test_planned_memory_within_ten_percent_of_the_measured_peak(tmp_path):
    """The ApolloMoE 0.5B shape on one GPU, 4 steps at 4096 tokens a row: peak memory as `medmoe plan` predicts."""
    from conftest import REPO

    from megatron_medmoe.config import load_stages, resolve_config
    from megatron_medmoe.plan.memory import GiB, peak_memory

    data = tmp_path / "data" / "text"
    run_medmoe(["preprocess", "--input", "examples/data/text/*.jsonl", "--tokenizer", "examples/tokenizer",
                "--format", "text", "--output-prefix", str(data), "--quiet"])
    over = ["parallel.expert=1", "moe.expert_slots=null", "training.micro_batch_size=1",
            "training.global_batch_size=4", "training.train_steps=4", "logging.log_interval=1",
            "checkpoint.save=null", "logging.tensorboard=false", f"data.datasets=[{{prefix: {data}}}]",
            "data.sampling=weighted", "data.packing=continuous", f"logging.output_dir={tmp_path / 'run'}"]
    run_medmoe(["train", "examples/apollomoe-0.5b.yaml", *over], CUDA_VISIBLE_DEVICES="0", timeout=900)
    measured = max(r["peak_memory_gib"] for r in read_metrics(tmp_path / "run"))
    cfg = resolve_config(load_stages(str(REPO / "examples" / "apollomoe-0.5b.yaml"), over)[0].config, world_size=1)
    planned = peak_memory(cfg, 7).total / GiB
    assert planned == pytest.approx(measured, rel=0.10), f"planned {planned:.2f} GiB, measured {measured:.2f} GiB"
