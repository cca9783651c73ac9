"""FP8 and grouped-GEMM options on a machine without TransformerEngine: the rules are checked at load, the
machine's limits when a run starts (no GPU, a GPU without FP8 tensor cores), and the options reach
megatron-core under its own names."""
import dataclasses

import pytest

from conftest import REPO, TINY
from megatron_medmoe.config import ConfigError, load_stages, resolve_config
from megatron_medmoe.model.backend import BackendError, check_machine, fp8_device_problem, use_transformer_engine
from megatron_medmoe.model.transformer_config import build_transformer_config, fp8_settings

FP8 = ["fp8.format=e4m3", "training.precision=bf16"]
ONE_RANK = ["parallel.expert=1", "moe.expert_slots=null"]


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def resolved(*overrides):
    return resolve_config(next(s.config for s in load_stages(TINY, list(overrides)) if s.name == "cpt"))


def problems(*overrides):
    with pytest.raises(ConfigError) as err:
        resolved(*overrides)
    return str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["fp8.format=e4m3"], "fp8.format=e4m3 needs training.precision=bf16"),
    (FP8 + ["model.transformer_impl=local"], "model.transformer_impl must be auto or transformer_engine, not local"),
    (FP8 + ["fp8.bf16_last_layers=1"], "cannot be used with fp8.recipe=delayed"),
    (FP8 + ["fp8.recipe=blockwise", "fp8.bf16_first_layers=5"], "can each be at most the layers of one pipeline "
                                                                "stage (4)"),
    (FP8 + ["fp8.recipe=blockwise", "fp8.bf16_first_layers=2", "fp8.bf16_last_layers=3"], "leaves no layer in FP8"),
    (FP8 + ["moe.token_dispatcher=allgather", "fp8.pad_expert_tokens=true"], "fp8.pad_expert_tokens needs "
                                                                             "moe.token_dispatcher=alltoall"),
    (["fp8.pad_expert_tokens=true"], "fp8.pad_expert_tokens pads expert token counts for FP8 GEMMs: it needs "
                                     "fp8.format"),
    (["fp8.format=e5m2"], "fp8.format"),
    (FP8 + ["fp8.amax_history_len=0"], "fp8.amax_history_len must be at least 1"),
    (["moe.grouped_gemm=true", "model.transformer_impl=local"] + ONE_RANK, "moe.grouped_gemm=true needs "
                                                                           "TransformerEngine layers"),
    (["moe.grouped_gemm=true"], "moe.grouped_gemm does not support padding slots"),
])
def test_fp8_and_grouped_gemm_rules(overrides, message):
    assert message in problems(*overrides)


def test_pipeline_stage_bounds_the_bf16_layers():
    assert "at most the layers of one pipeline stage (1)" in problems(
        *FP8, *ONE_RANK, "fp8.recipe=tensorwise", "fp8.bf16_first_layers=2", "parallel.pipeline=4")


def test_defaults_resolve_to_what_the_layout_allows():
    cfg = resolved(*FP8)
    assert cfg.fp8.pad_expert_tokens is True  # alltoall dispatcher
    assert cfg.moe.grouped_gemm is False  # 8 slots for 7 experts on 2 ranks: a padding slot
    assert resolved(*FP8, "moe.token_dispatcher=allgather").fp8.pad_expert_tokens is False
    assert resolved(*ONE_RANK).moe.grouped_gemm is None  # decided by the machine: on with TransformerEngine
    assert resolved(*ONE_RANK).fp8.pad_expert_tokens is None  # no FP8


def test_options_reach_megatron_core_under_its_names():
    from megatron.core.transformer import TransformerConfig

    cfg = resolved(*FP8, "fp8.recipe=blockwise", "fp8.bf16_first_layers=1", "fp8.bf16_last_layers=1",
                   "fp8.format=hybrid")
    settings = fp8_settings(cfg)
    assert settings == dict(fp8="hybrid", fp8_recipe="blockwise", fp8_margin=0, fp8_amax_history_len=1024,
                            fp8_amax_compute_algo="max", first_last_layers_bf16=True, num_layers_at_start_in_bf16=1,
                            num_layers_at_end_in_bf16=1, moe_router_padding_for_quantization=True)
    assert set(settings) <= {f.name for f in dataclasses.fields(TransformerConfig)}
    assert "first_last_layers_bf16" not in fp8_settings(resolved(*FP8))
    assert "moe_router_padding_for_quantization" not in fp8_settings(resolved(*FP8, "moe.moe_last_n=0",
                                                                              "parallel.expert=1"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_without_transformer_engine_the_local_spec_is_used_and_fp8_is_refused():
    assert use_transformer_engine("auto") is False
    cfg = resolved(*ONE_RANK)
    assert build_transformer_config(cfg, use_cpu_initialization=True).moe_grouped_gemm is False
    check_machine(cfg)  # nothing asked for that needs TransformerEngine
    with pytest.raises(BackendError, match="fp8.format=e4m3 needs TransformerEngine layers, which cannot be used "
                                           r"here \(no GPU is present\)"):
        check_machine(resolved(*FP8, *ONE_RANK))
    with pytest.raises(BackendError, match="model.transformer_impl=transformer_engine, but TransformerEngine cannot"):
        check_machine(resolved(*FP8, *ONE_RANK, "model.transformer_impl=transformer_engine"))


@pytest.mark.parametrize("name, capability, recipe, expected", [
    ("NVIDIA A100-SXM4-80GB", (8, 0), "delayed", "NVIDIA A100-SXM4-80GB (compute capability 8.0) has no FP8 "
                                                 "tensor cores"),
    ("NVIDIA L40S", (8, 9), "delayed", ""),
    ("NVIDIA L40S", (8, 9), "blockwise", "fp8.recipe=blockwise needs compute capability 9.0 or newer (Hopper); "
                                         "NVIDIA L40S has 8.9"),
    ("NVIDIA H100 80GB HBM3", (9, 0), "blockwise", ""),
    ("NVIDIA B200", (10, 0), "tensorwise", ""),
])
def test_gpus_without_fp8_are_named(name, capability, recipe, expected):
    problem = fp8_device_problem(recipe, name, capability)
    assert expected in problem if expected else problem == ""


def test_a_checkpoint_trained_in_fp8_loads_for_inference_and_conversion():
    """Analysis, evaluation and conversion run the checkpoint's model in fp32 with local layers: its FP8 and
    grouped-GEMM settings are dropped, not refused."""
    from megatron_medmoe.inference.loaded import inference_config

    trained = resolved(*FP8, *ONE_RANK, "fp8.recipe=blockwise", "fp8.bf16_last_layers=1", "moe.grouped_gemm=true")
    cfg = inference_config(trained, 1, local=True)
    assert cfg.fp8.format is None and cfg.training.precision == "fp32" and cfg.model.transformer_impl == "local"
    assert cfg.moe.grouped_gemm is False  # experts one by one, as the analysis tools' neuron hooks read them
    assert build_transformer_config(cfg, use_cpu_initialization=True).fp8 is None
