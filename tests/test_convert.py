"""Hugging Face <-> megatron-core conversion, checked against transformers' own models built from tiny
random configs (transformers' config classes, save_pretrained; nothing is downloaded): exact tensor round
trips for dense Qwen2 (tied and untied), Qwen2-MoE and ApolloMoE, through checkpoints re-saved under TP 2,
PP 2, EP 2 and TP 2 x EP 2 by real `medmoe train` processes; `verify` on each (hard routing included);
upcycling as the spec predicts; what the ApolloMoE release code cannot load refused; and every kind of bad
input (damaged safetensors headers too) with nothing left at the destination."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_medmoe
from megatron_medmoe.convert.errors import ConvertError
from megatron_medmoe.convert.hf_io import HFTensors
from megatron_medmoe.convert.hf_to_mcore import hf_to_mcore
from megatron_medmoe.convert.mcore_to_hf import mcore_to_hf
from megatron_medmoe.runtime.exit_codes import EXIT_FAILURE, EXIT_INPUT

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6)


def dense_qwen2(path, tied=True, dtype=torch.float32, seed=0, **shape):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, **shape}, tie_word_embeddings=tied)).to(dtype)
    with torch.no_grad():  # transformers zero-initialises biases: make the q/k/v bias transform matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    return str(path)


def qwen2_moe(path, shared=0, **extra):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(1)
    config = Qwen2MoeConfig(**SHAPE, moe_intermediate_size=80, num_experts=7, num_experts_per_tok=2,
                            norm_topk_prob=False, mlp_only_layers=[0, 1], shared_expert_intermediate_size=shared,
                            tie_word_embeddings=False, **extra)
    model = Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 0.5)
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.5)  # transformers starts routers at zero: make routing matter
                if not shared:
                    layer.mlp.shared_expert_gate.weight.zero_()  # no shared expert: what an export writes
    model.save_pretrained(path)
    return str(path)


def tensors(hf_dir):
    out = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, name)))
    return out


def assert_same_tensors(a_dir, b_dir, skip=()):
    a, b = tensors(a_dir), tensors(b_dir)
    a = {k: v for k, v in a.items() if not any(s in k for s in skip)}
    b = {k: v for k, v in b.items() if not any(s in k for s in skip)}
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def verify(hf_dir, ckpt, *extra):
    proc = run_medmoe(["convert", "verify", "--hf", str(hf_dir), "--ckpt", str(ckpt), *extra])
    assert "verify: PASS" in proc.stdout
    return proc


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_dense_qwen2_round_trip_is_exact_and_verifies(tmp_path, tied):
    hf = dense_qwen2(tmp_path / "hf", tied=tied)
    ckpt = hf_to_mcore(hf, str(tmp_path / "ckpt"), quiet=True)
    out = mcore_to_hf(ckpt, str(tmp_path / "back"), "qwen2", quiet=True)
    assert_same_tensors(hf, out)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and ("lm_head.weight" in tensors(out)) is not tied
    verify(out, ckpt)


def test_qwen2_moe_in_and_out_loads_in_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = qwen2_moe(tmp_path / "hf")
    ckpt = hf_to_mcore(hf, str(tmp_path / "ckpt"), quiet=True)
    proc = run_medmoe(["convert", "mcore-to-hf", "--ckpt", ckpt, "--out", str(tmp_path / "back"),
                       "--format", "qwen2_moe", "--verify", "--quiet"])
    assert "verify: PASS" in proc.stdout
    assert_same_tensors(hf, tmp_path / "back")  # the size-0 shared expert included
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back")  # no trust_remote_code
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    shared = model.model.layers[3].mlp.shared_expert
    assert shared.down_proj.weight.numel() == 0  # the absent shared expert adds exactly zero


@pytest.mark.multiprocess
def test_qwen2_moe_with_a_shared_expert_maps_to_megatron_cores_gated_shared_expert(tmp_path):
    hf = qwen2_moe(tmp_path / "hf", shared=48)
    ckpt = hf_to_mcore(hf, str(tmp_path / "ckpt"), quiet=True)
    recipe = os.path.join(ckpt, "iter_0000000", "run_config.yaml")
    run_medmoe(["train", recipe, "parallel.tensor=2", f"checkpoint.load={ckpt}", "checkpoint.finetune=true",
                f"checkpoint.save={tmp_path / 'tp2'}", "training.train_steps=0", f"logging.output_dir={tmp_path / 'out'}"])
    out = mcore_to_hf(str(tmp_path / "tp2"), str(tmp_path / "back"), "qwen2_moe", quiet=True)
    assert_same_tensors(hf, out)  # the shared expert split over TP 2 and gathered back
    assert json.loads((tmp_path / "back" / "config.json").read_text())["shared_expert_intermediate_size"] == 48
    verify(out, tmp_path / "tp2")
    with pytest.raises(ConvertError, match="shared expert, which the released ApolloMoE layout cannot hold"):
        mcore_to_hf(ckpt, str(tmp_path / "apollo"), "apollo_moe", quiet=True)


def test_apollo_moe_format_in_and_out(tmp_path):
    hf = qwen2_moe(tmp_path / "hf")
    ckpt = hf_to_mcore(hf, str(tmp_path / "ckpt"), quiet=True)
    apollo = mcore_to_hf(ckpt, str(tmp_path / "apollo"), "apollo_moe", quiet=True)
    config = json.loads((tmp_path / "apollo" / "config.json").read_text())
    assert config["model_type"] == "upcycling-qwen2-moe" and config["mlp_only_layers"] == [0, 1]
    assert config["norm_topk_prob"] is False and config["share_flag"] is False and config["language_gate"] is True
    assert not any("shared_expert" in k for k in tensors(apollo))
    assert_same_tensors(hf, apollo, skip=("shared_expert",))
    again = hf_to_mcore(apollo, str(tmp_path / "again"), quiet=True)  # read from config and weights alone
    verify(apollo, again)


@pytest.mark.parametrize("moe_last_n", [1, 3])
def test_apollo_moe_refuses_moe_layers_its_release_code_does_not_build(tmp_path, moe_last_n):
    """The release code makes exactly the last 2 layers MoE whatever config.json says."""
    ckpt = hf_to_mcore(dense_qwen2(tmp_path / "hf"), str(tmp_path / "ckpt"), upcycle_last_n=moe_last_n, quiet=True)
    with pytest.raises(ConvertError, match=f"its last {moe_last_n} layers MoE .* exactly the last 2 .* use --format "
                                           "qwen2_moe"):
        mcore_to_hf(ckpt, str(tmp_path / "apollo"), "apollo_moe", quiet=True)
    assert not (tmp_path / "apollo").exists()


def resave_hard_routed(ckpt, root):
    """`ckpt` loaded and saved again by `medmoe train` with moe.routing=hard (each token to its family expert)."""
    run_medmoe(["train", os.path.join(ckpt, "iter_0000000", "run_config.yaml"), "moe.routing=hard", "moe.topk=1",
                f"checkpoint.load={ckpt}", "checkpoint.finetune=true", f"checkpoint.save={root / 'hard'}",
                "training.train_steps=0", f"logging.output_dir={root / 'out'}"])
    return str(root / "hard")


@pytest.fixture(scope="module")
def hard_routed(tmp_path_factory):
    """(Qwen2-MoE source, our hard-routed checkpoint of it, its qwen2_moe export)."""
    root = tmp_path_factory.mktemp("hard")
    hf = qwen2_moe(root / "hf")
    hard = resave_hard_routed(hf_to_mcore(hf, str(root / "ckpt"), quiet=True), root)
    return hf, hard, mcore_to_hf(hard, str(root / "export"), "qwen2_moe", quiet=True)


def test_hard_routing_is_refused_by_apollo_moe_and_noted_by_qwen2_moe(tmp_path, hard_routed, capsys):
    hf, hard, export = hard_routed
    with pytest.raises(ConvertError, match="moe.routing hard.* soft top-1: use --format qwen2_moe"):
        mcore_to_hf(hard, str(tmp_path / "apollo"), "apollo_moe", quiet=True)
    assert not (tmp_path / "apollo").exists()
    mcore_to_hf(hard, str(tmp_path / "moe"), "qwen2_moe")
    assert "(moe.routing hard), which no Hugging Face config can say" in capsys.readouterr().out
    assert_same_tensors(hf, export)


def test_verify_runs_transformers_with_the_hard_routing_of_the_checkpoint(hard_routed):
    from megatron_medmoe.convert.verify import verify as verify_here

    _, hard, export = hard_routed
    agreement = verify_here(export, hard)  # transformers' routers send each token to its family expert, weight 1
    assert agreement.passed, agreement.describe()
    assert "hard routing: each token sent to a random family expert" in agreement.describe()


def test_upcycled_and_hard_routed_at_step_zero_is_the_dense_model(tmp_path):
    """Hard routing weighs its one expert (a copy of the dense MLP) by 1."""
    from megatron_medmoe.convert.verify import verify_upcycled

    hf = dense_qwen2(tmp_path / "hf")
    hard = resave_hard_routed(hf_to_mcore(hf, str(tmp_path / "up"), upcycle_last_n=2, quiet=True), tmp_path)
    agreement = verify_upcycled(hf, hard)
    assert agreement.passed, agreement.describe()


def test_upcycled_model_at_step_zero_is_the_dense_model_as_the_spec_predicts(tmp_path):
    hf = dense_qwen2(tmp_path / "hf")
    proc = run_medmoe(["convert", "hf-to-mcore", "--hf", hf, "--out", str(tmp_path / "up"), "--upcycle-last-n", "2",
                       "--seed", "7", "--verify", "--quiet"])
    assert "verify: PASS" in proc.stdout  # each MoE layer = (p_a + p_b) x the dense MLP
    plain = run_medmoe(["convert", "verify", "--hf", hf, "--ckpt", str(tmp_path / "up")], check=False)
    assert plain.returncode == EXIT_FAILURE and "verify: FAIL" in plain.stdout  # not the dense model itself
    moe = mcore_to_hf(str(tmp_path / "up"), str(tmp_path / "moe"), "qwen2_moe", quiet=True)
    weights = tensors(moe)
    for e in range(7):  # every expert a copy of the dense MLP
        assert torch.equal(weights[f"model.layers.3.mlp.experts.{e}.up_proj.weight"],
                           tensors(hf)["model.layers.3.mlp.up_proj.weight"])
    router = weights["model.layers.2.mlp.gate.weight"]
    assert router.std().item() == pytest.approx(0.02, rel=0.2)


LAYOUTS = {  # TP x EP splits attention, MLPs and experts at once (TP alone and EP alone add no other cut)
    "pp2": ["parallel.pipeline=2"],
    "tp2xep2": ["parallel.tensor=2", "parallel.expert=2", "moe.expert_slots=8"],  # 4 processes
}


@pytest.fixture(scope="module")
def converted_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    hf = qwen2_moe(root / "hf")
    from transformers import AutoModelForCausalLM

    bf16 = root / "hf_bf16"  # a bfloat16 checkpoint, as released models are
    AutoModelForCausalLM.from_pretrained(hf).to(torch.bfloat16).save_pretrained(bf16)
    return root, str(bf16), hf_to_mcore(str(bf16), str(root / "ckpt"), quiet=True)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_from_a_checkpoint_saved_under_another_layout(tmp_path, converted_moe, layout):
    """The converted checkpoint loaded and re-saved by `medmoe train` under the layout (experts spread over
    expert-parallel ranks, layers over pipeline stages), then exported: every tensor as it was."""
    root, hf, ckpt = converted_moe
    recipe = os.path.join(ckpt, "iter_0000000", "run_config.yaml")
    run_medmoe(["train", recipe, *LAYOUTS[layout], f"checkpoint.load={ckpt}", "checkpoint.finetune=true",
                f"checkpoint.save={tmp_path / 'saved'}", "training.train_steps=0",
                f"logging.output_dir={tmp_path / 'out'}"])
    out = run_medmoe(["convert", "mcore-to-hf", "--ckpt", str(tmp_path / "saved"), "--out", str(tmp_path / "hf"),
                      "--format", "qwen2_moe", "--dtype", "bfloat16", "--max-shard-size", "200KB", "--quiet"])
    assert "wrote" in out.stdout
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # sharded, with an index
    assert_same_tensors(hf, tmp_path / "hf")
    verify(tmp_path / "hf", tmp_path / "saved")


def broken(tmp_path, change):
    hf = dense_qwen2(tmp_path / "hf")
    change(tmp_path / "hf")
    return hf


def drop_tensor(d):
    t = load_file(d / "model.safetensors")
    del t["model.layers.1.self_attn.k_proj.bias"]
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def reshape_tensor(d):
    t = load_file(d / "model.safetensors")
    t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.2.mlp.up_proj.weight"][:90].clone()
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def set_config(**fields):
    def change(d):
        config = json.loads((d / "config.json").read_text())
        config.update(fields)
        (d / "config.json").write_text(json.dumps(config))
    return change


def truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])


def rewrite_header(path, change):
    """Apply change(header) to a safetensors file's JSON header, the tensor bytes left as they are."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def short_byte_range(d):
    def change(header):
        header["model.layers.1.mlp.up_proj.weight"]["data_offsets"][1] -= 4
    rewrite_header(d / "model.safetensors", change)


@pytest.mark.parametrize("change, message", [
    (drop_tensor, "tensor 'model.layers.1.self_attn.k_proj.bias' is missing"),
    (reshape_tensor, "tensor 'model.layers.2.mlp.up_proj.weight' has shape (90, 64), expected (96, 64)"),
    (set_config(model_type="llama"), "model_type 'llama' is not supported"),
    (truncate, "model.safetensors: cannot read it as safetensors (truncated"),
    (short_byte_range, "model.safetensors: the safetensors header's entry for 'model.layers.1.mlp.up_proj.weight' "
                       "is damaged: data_offsets"),
    (set_config(hidden_act="gelu"), "hidden_act='gelu' cannot be converted"),
], ids=["missing", "shape", "model_type", "truncated", "byte_range", "activation"])
def test_bad_sources_are_refused_and_leave_nothing(tmp_path, change, message):
    hf = broken(tmp_path, change)
    proc = run_medmoe(["convert", "hf-to-mcore", "--hf", hf, "--out", str(tmp_path / "out"), "--quiet"], check=False)
    assert proc.returncode == EXIT_INPUT, proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial*"))


def shift(name, by):
    def change(header):
        header[name]["data_offsets"] = [o + by for o in header[name]["data_offsets"]]
    return change


def set_entry(name, **fields):
    def change(header):
        header[name].update(fields)
    return change


@pytest.mark.parametrize("change, message", [
    (shift("a", 4), "the byte ranges of 'a' [4, 20] and 'b' [16, 40] overlap"),
    (shift("b", 10**9), "truncated, or its header is damaged: 'b' ends at byte"),
    (set_entry("a", data_offsets=[-16, 0]), "entry for 'a' is damaged: data_offsets [-16, 0] is not a byte range"),
    (set_entry("a", shape=[3, 2]), "entry for 'a' is damaged: data_offsets [0, 16] hold 16 bytes where F32 [3, 2] "
                                   "needs 24"),
    (set_entry("b", dtype="F8"), "entry for 'b' is damaged: dtype 'F8' is not a safetensors dtype"),
    (lambda header: header["a"].pop("data_offsets"), "entry for 'a' is damaged: the entry is not an object"),
], ids=["overlap", "outside", "negative", "size", "dtype", "no_offsets"])
def test_a_damaged_safetensors_header_is_refused_naming_the_tensor(tmp_path, change, message):
    save_file({"a": torch.ones(2, 2), "b": torch.zeros(6)}, tmp_path / "model.safetensors")
    rewrite_header(tmp_path / "model.safetensors", change)
    with pytest.raises(ConvertError) as refused:
        HFTensors(str(tmp_path))
    assert str(refused.value).startswith(f"{tmp_path / 'model.safetensors'}: ") and message in str(refused.value)


@pytest.mark.parametrize("extra, message", [
    ({"norm_topk_prob": True}, "norm_topk_prob=True cannot be converted"),
    ({"mlp_only_layers": [0, 3]}, "mlp_only_layers=[0, 3] cannot be converted"),
])
def test_moe_features_post_moe_cannot_express_are_refused_by_name(tmp_path, extra, message):
    hf = qwen2_moe(tmp_path / "hf")
    set_config(**extra)(tmp_path / "hf")
    with pytest.raises(ConvertError, match=message.replace("[", r"\[").replace("]", r"\]")):
        hf_to_mcore(hf, str(tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout, message", [
    (["--tensor", "3"], "num_attention_heads"),
    (["--expert", "2"], "expert"),
])
def test_a_layout_the_model_cannot_split_into_is_refused(tmp_path, layout, message):
    hf = qwen2_moe(tmp_path / "hf")
    proc = run_medmoe(["convert", "hf-to-mcore", "--hf", hf, "--out", str(tmp_path / "out"), *layout], check=False)
    assert proc.returncode == EXIT_INPUT
    assert "cannot be split into" in proc.stderr and message in proc.stderr
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_format_that_does_not_fit_and_an_existing_destination(tmp_path):
    hf = dense_qwen2(tmp_path / "hf")
    ckpt = hf_to_mcore(hf, str(tmp_path / "ckpt"), quiet=True)
    with pytest.raises(ConvertError, match="dense model .* use --format qwen2"):
        mcore_to_hf(ckpt, str(tmp_path / "moe"), "qwen2_moe", quiet=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep me")
    with pytest.raises(ConvertError, match="already exists and is not empty"):
        mcore_to_hf(ckpt, str(tmp_path / "taken"), "qwen2", quiet=True)
    assert (tmp_path / "taken" / "file").read_text() == "keep me"
    assert not (tmp_path / "moe").exists()
