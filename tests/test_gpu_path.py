"""The GPU branch where it can be checked without a GPU: TransformerEngine MoE layers keep the on-disk name of
the pre-MLP norm, a GPU without TransformerEngine gets megatron-core's missing router symbol, and FP8 recipes
are refused on TransformerEngine releases that cannot build them."""
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cpu_env


def test_te_moe_layers_save_the_pre_mlp_norm_under_the_local_specs_key(megatron_single_rank):
    """megatron-core's TE spec gives MoE layers a TENorm saved as pre_mlp_layernorm.weight; its local spec (and
    our name table) use mlp.linear_fc1.layer_norm_weight. The key map makes the TE layer write the local name."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.utils import apply_prefix_mapping
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from conftest import tiny_config
    from megatron_medmoe.model.gpt import build_model_chunks
    from megatron_medmoe.model.spec import with_fused_norm_key

    (model,) = build_model_chunks(tiny_config("cpt", ["parallel.expert=1", "moe.expert_slots=null"], world_size=1), 7)
    local_keys = {v.key for k, v in model.sharded_state_dict().items() if k.startswith("decoder.layers.3.")}
    assert "decoder.layers.3.mlp.linear_fc1.layer_norm_weight" in local_keys  # layer 4 (index 3) is MoE

    te_moe_layer = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=IdentityOp, mlp=ModuleSpec(module=MoELayer),
        sharded_state_dict_keys_map={"mlp.0.weight": "mlp.linear_fc1.layer_norm_weight"}))  # as megatron-core's TE spec
    keys_map = with_fused_norm_key(te_moe_layer).submodules.sharded_state_dict_keys_map
    prefix = "decoder.layers.3."
    saved = {name: ShardedTensor.from_rank_offsets(f"{prefix}{name}", torch.zeros(2))
             for name in ("pre_mlp_layernorm.weight", "pre_mlp_layernorm._extra_state")}
    apply_prefix_mapping(saved, {f"{prefix}{k}": f"{prefix}{v}" for k, v in keys_map.items()})  # as TransformerLayer
    assert saved["pre_mlp_layernorm.weight"].key == "decoder.layers.3.mlp.linear_fc1.layer_norm_weight"
    assert saved["pre_mlp_layernorm._extra_state"].key == "decoder.layers.3.pre_mlp_layernorm._extra_state"
    assert keys_map["mlp.0.weight"] == "mlp.linear_fc1.layer_norm_weight"  # megatron-core's own entries stay


def test_a_gpu_without_transformer_engine_gets_the_router_symbol():
    """megatron-core binds moe_utils.te_general_gemm only when TE imports, then tests it: a NameError on any
    GPU without TE. The stand-in is applied on GPUs too (simulated here: the GPU check answers yes)."""
    code = ("import torch; from megatron_medmoe.runtime import cpu_compat; cpu_compat.gpu_present = lambda: True; "
            "assert cpu_compat.apply_if_cpu() is False; import megatron.core.transformer.moe.moe_utils as m; "
            "print(tuple(m.router_gating_linear(torch.randn(4, 8), torch.randn(3, 8), None, torch.float32).shape))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("(4, 3)"), proc.stderr[-2000:]


@pytest.mark.parametrize("recipe, version, refused", [
    ("blockwise", "2.2.0", True), ("blockwise", "2.3.0", False), ("tensorwise", "2.1.0", True),
    ("tensorwise", "2.2.0", False), ("delayed", "2.9.0", False), ("blockwise", "2.10.0+abc", False)])
def test_fp8_recipes_need_the_transformer_engine_release_that_builds_them(recipe, version, refused):
    from megatron_medmoe.model.backend import te_version_problem

    problem = te_version_problem(recipe, version)
    assert bool(problem) == refused
    if refused:
        assert f"fp8.recipe={recipe} needs TransformerEngine" in problem and version in problem


def test_more_ranks_than_gpus_is_refused_where_no_launcher_binds_them():
    from megatron_medmoe.runtime.distributed import gpu_of_rank
    from megatron_medmoe.runtime.env import DistEnv, LaunchEnvError

    rank = lambda launcher, local: DistEnv(launcher, local, 2, local, "127.0.0.1", 29500)  # noqa: E731
    assert gpu_of_rank(rank("torchrun", 1), 2) == 1
    with pytest.raises(LaunchEnvError, match="rank 1 is local rank 1 of a node with 1 GPU"):
        gpu_of_rank(rank("torchrun", 1), 1)  # medmoe train's workers and torchrun show every rank all GPUs
    assert gpu_of_rank(rank("slurm", 1), 1) == 0  # srun may bind one GPU to each task


def test_fusions_are_on_where_they_can_run_and_required_ones_are_refused_elsewhere():
    from megatron_medmoe.config.schema import FusionConfig
    from megatron_medmoe.model.backend import fusion_settings

    on, problems = fusion_settings(FusionConfig(), on_gpu=True, use_te=True)  # as Megatron-LM's recipes set them
    assert all(on.values()) and set(on) >= {"bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
                                            "gradient_accumulation_fusion", "moe_permute_fusion",
                                            "cross_entropy_loss_fusion"} and not problems
    local, _ = fusion_settings(FusionConfig(), on_gpu=True, use_te=False)  # a GPU without TransformerEngine
    assert [k for k, v in local.items() if v] == ["bias_activation_fusion", "masked_softmax_fusion",
                                                  "cross_entropy_loss_fusion"]
    cpu, problems = fusion_settings(FusionConfig(rope=False), on_gpu=False, use_te=False)
    assert not any(cpu.values()) and not problems
    _, problems = fusion_settings(FusionConfig(rope=True, cross_entropy=True), on_gpu=True, use_te=False)
    assert problems == ["fusions.rope=true, but the layers are not TransformerEngine's: set it to null (on where it "
                        "can run) or false"]
    off, _ = fusion_settings(FusionConfig(bias_activation=False), on_gpu=True, use_te=True)
    assert not off["bias_activation_fusion"] and off["apply_rope_fusion"]


def test_a_fusion_required_on_a_machine_without_a_gpu_is_refused_before_any_worker_starts(tmp_path):
    from conftest import run_medmoe, train_stage

    proc = run_medmoe(train_stage("cpt", "fusions.cross_entropy=true", f"logging.output_dir={tmp_path}"),
                      check=False, timeout=120)
    assert proc.returncode == 2 and "fusions.cross_entropy=true, but no GPU is present" in proc.stderr
    assert "Traceback" not in proc.stderr and "starting" not in proc.stdout
