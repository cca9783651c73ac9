"""Config loading and the validation rules: each broken rule is an error naming the field, before any
process starts."""
import time

import pytest
import yaml

from conftest import REPO, TINY, run_medmoe, train_stage
from megatron_medmoe.config import ConfigError, dump_config, load_config, load_stages, resolve_config


def cpt(overrides=()):
    return next(s.config for s in load_stages(TINY, overrides) if s.name == "cpt")


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name files relative to the repository


def problems(overrides, world_size=None):
    with pytest.raises(ConfigError) as err:
        resolve_config(cpt(overrides), world_size=world_size)
    return str(err.value)


def test_tiny_recipe_resolves():
    cfg = resolve_config(cpt())
    assert cfg.model.vocab_size == 1024  # from the dataset's summary (the bundled tokenizer)
    assert cfg.parallel.data == 2  # the smallest data-parallel size that holds EP 2
    assert cfg.moe.expert_slots == 8 and cfg.parallel.expert_tensor == 1
    assert cfg.parallel.sequence_parallel is False


def test_tensor_parallel_must_divide_heads():
    msg = problems(["parallel.tensor=3", "model.num_attention_heads=4"])
    assert "parallel.tensor (3) must divide model.num_attention_heads (4)" in msg


def test_tensor_parallel_must_divide_kv_heads():
    msg = problems(["parallel.tensor=4", "model.num_attention_heads=8", "model.num_query_groups=2",
                    "model.hidden_size=64"])
    assert "parallel.tensor (4) must divide model.num_query_groups (2" in msg


def test_an_impossible_layout_is_reported_alone():
    tensor7 = ("parallel.tensor (7) must divide model.num_attention_heads (4), model.num_query_groups (2, the key/value "
               "heads) and model.ffn_hidden_size (176): choose 1 or 2")
    for world_size in (None, 2):  # not also data.seq_length, the vocabulary padding, expert_tensor or the world size
        with pytest.raises(ConfigError) as err:
            resolve_config(cpt(["parallel.tensor=7"]), world_size=world_size)
        assert err.value.problems == [tensor7]
    with pytest.raises(ConfigError) as err:  # what does not follow from the tensor size is still named
        resolve_config(cpt(["parallel.tensor=7", "parallel.expert_tensor=3", "training.global_batch_size=6"]))
    assert err.value.problems == [tensor7, "parallel.expert_tensor (3) must divide moe.expert_ffn_hidden_size (176)",
                                  "training.global_batch_size (6) must be a positive multiple of "
                                  "training.micro_batch_size (4)"]
    # with a tensor size that fits, the rules combining it with other fields apply
    assert "data.seq_length (127) must be divisible by parallel.tensor (2) under sequence parallelism" in problems(
        ["parallel.tensor=2", "data.seq_length=127"])


def test_a_vocabulary_below_the_datasets_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_config(cpt(["model.vocab_size=1000"]))
    assert err.value.problems == [
        "model.vocab_size (1000) is below the vocabulary of data.datasets[0] 'runs/data/tiny_text' (1024 token ids, "
        "from runs/data/tiny_text.json): set model.vocab_size to at least 1024, or null to take it from the datasets"]
    assert resolve_config(cpt(["model.vocab_size=1024"])).model.vocab_size == 1024
    (tmp_path / "old.json").write_text('{"documents": 3}')  # a summary that does not say: named, no KeyError
    msg = problems([f"data.datasets=[{{prefix: runs/data/tiny_text}}, {{prefix: {tmp_path / 'old'}}}]"])
    assert f"data.datasets[1].prefix: {tmp_path / 'old'}.json records no vocab_size" in msg


def test_expert_parallel_must_divide_experts_and_suggests_padding():
    msg = problems(["parallel.expert=2", "moe.expert_slots=null"])
    assert "parallel.expert (2) must divide the number of experts (7" in msg
    assert "moe.expert_slots=8" in msg


def test_expert_parallel_three_with_twelve_language_experts_is_fine():
    cfg = resolve_config(cpt(["data.language_table=languages12", "parallel.expert=3",
                                            "moe.expert_slots=null", "training.global_batch_size=12"]))
    assert cfg.moe.expert_slots == 12 and cfg.parallel.data == 3


def test_more_moe_layers_than_layers():
    msg = problems(["model.num_layers=4", "moe.moe_last_n=5"])
    assert "moe.moe_last_n (5) must be between 0 and model.num_layers (4)" in msg


def test_world_size_must_be_tp_pp_dp():
    msg = problems(["parallel.tensor=2", "parallel.expert=1", "moe.expert_slots=null", "parallel.data=2"], world_size=6)
    assert "world size 6 is not parallel.tensor x parallel.pipeline x parallel.data (2 x 1 x 2 = 4)" in msg
    msg = problems(["parallel.tensor=2", "parallel.expert=1", "moe.expert_slots=null"], world_size=3)
    assert "world size 3 is not a multiple of parallel.tensor x parallel.pipeline (2 x 1)" in msg


def test_launcher_world_size_sets_data_parallel():
    cfg = resolve_config(cpt(["parallel.tensor=2", "parallel.expert=1", "moe.expert_slots=null"]),
                         world_size=8)
    assert cfg.parallel.data == 4 and cfg.parallel.sequence_parallel is True


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError) as err:
        load_stages(TINY, ["model.hiden_size=32"])
    assert "model.hiden_size: unknown key; did you mean 'model.hidden_size'?" in str(err.value)


def test_unknown_key_in_a_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  num_layers: 2\ntraining:\n  step_count: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(recipe))
    assert "training.step_count: unknown key" in str(err.value) and str(recipe) in str(err.value)


def test_wrong_types_are_named():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.num_layers=four", "moe.routing=random", "parallel.sequence_parallel=3"])
    msg = str(err.value)
    assert "model.num_layers: expected an integer, got 'four'" in msg
    assert "moe.routing: expected one of 'hybrid', 'topk', 'hard'" in msg
    assert "parallel.sequence_parallel: expected true or false or null" in msg


def test_all_problems_reported_together():
    msg = problems(["parallel.tensor=3", "moe.moe_last_n=9", "training.global_batch_size=7"])
    assert msg.count("\n  - ") >= 3


def test_more_layout_rules():
    assert "needs parallel.pipeline > 1" in problems(["parallel.virtual_pipeline=2"])
    assert "must be divisible by parallel.pipeline x parallel.virtual_pipeline" in problems(
        ["parallel.pipeline=3", "parallel.expert=1", "moe.expert_slots=null"])
    assert "moe.topk must be 1 when moe.routing is 'hard'" in problems(["moe.routing=hard"])
    assert "parallel.sequence_parallel must be true" in problems(
        ["parallel.tensor=2", "parallel.sequence_parallel=false", "parallel.expert=1", "moe.expert_slots=null"])
    assert "training.global_batch_size (6) must be a positive multiple" in problems(["training.global_batch_size=6"])
    assert "moe.expert_placement: two experts share a slot" in problems(["moe.expert_placement=[0,0,1,2,3,4,5]"])
    assert "data.datasets[0].prefix: 'nowhere/x' is not a preprocessed dataset" in problems(
        ["data.datasets=[{prefix: nowhere/x}]"])
    assert "data.datasets[0].weight must be > 0" in problems(["data.datasets=[{prefix: runs/data/tiny_text, weight: 0}]"])
    assert "parallel.ddp_bucket_size only applies with parallel.overlap_grad_reduce=true" in problems(
        ["parallel.ddp_bucket_size=1000000"])
    assert "parallel.ddp_bucket_size (0) must be positive" in problems(
        ["parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=0"])


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["training.lr=1e-4", "data.datasets=[{prefix: a, weight: 2}, {prefix: b}]",
                             "parallel.data=null", "model.tie_embeddings=true"])
    assert cfg.training.lr == pytest.approx(1e-4)
    assert [(d.prefix, d.weight) for d in cfg.data.datasets] == [("a", 2.0), ("b", 1.0)]
    assert cfg.parallel.data is None and cfg.model.tie_embeddings
    with pytest.raises(ConfigError, match="data.datasets: expected a list of DatasetSpec"):
        load_config(None, ["data.datasets=[{prefix: a, wieght: 2}]"])


def test_resolved_config_round_trips(tmp_path):
    cfg = resolve_config(cpt(["parallel.expert=1", "moe.expert_slots=null"]))
    path = tmp_path / "run_config.yaml"
    dump_config(cfg, str(path))
    again = load_config(str(path))
    assert again == cfg
    assert yaml.safe_load(path.read_text())["moe"]["expert_slots"] == 7


def test_cli_rejects_a_bad_config_before_starting_processes(tmp_path):
    start = time.monotonic()
    proc = run_medmoe(train_stage("cpt", "parallel.expert=2", "moe.expert_slots=null", "model.vocab_size=1000",
                                  f"logging.output_dir={tmp_path / 'out'}"), check=False, timeout=120)
    assert proc.returncode == 2
    assert "parallel.expert (2) must divide the number of experts (7" in proc.stderr
    assert "model.vocab_size (1000) is below the vocabulary of data.datasets[0]" in proc.stderr
    assert "starting" not in proc.stdout and not (tmp_path / "out").exists()
    assert time.monotonic() - start < 60


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without GPUs")
@pytest.mark.parametrize("override, message", [
    ("model.transformer_impl=transformer_engine", "TransformerEngine cannot be used here (no GPU is present)"),
    ("training.precision=bf16", "training.precision=bf16 needs GPUs"),
    ("fp8.format=hybrid training.precision=bf16", "fp8.format=hybrid needs TransformerEngine layers, which cannot be "
                                                  "used here (no GPU is present); remove fp8.format"),
    ("parallel.overlap_grad_reduce=true parallel.overlap_param_gather=true",
     "parallel.overlap_param_gather needs the distributed optimizer, which runs on GPUs"),
    ("parallel.overlap_param_gather=true", "parallel.overlap_param_gather needs parallel.overlap_grad_reduce=true"),
])
def test_cli_refuses_gpu_only_options_on_cpu(tmp_path, override, message):
    proc = run_medmoe(train_stage("cpt", *override.split(), f"logging.output_dir={tmp_path}"), check=False,
                      timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
