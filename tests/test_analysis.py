"""The look-inside tools on a briefly trained tiny model, as real `medmoe` processes: LAPE (a planted neuron,
TP2 = TP1, steering), routing analysis, the Lens stage, and multiple-choice evaluation against transformers."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from conftest import REPO, TOKENIZER, cpu_env, read_metrics, run_medmoe

TEXT = REPO / "examples" / "data" / "text"
ONE_PROCESS = ["parallel.expert=1", "moe.expert_slots=null"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The tiny model after 30 cpt steps in one process (a save directory)."""
    root = tmp_path_factory.mktemp("trained")
    run_medmoe(["train", str(REPO / "examples" / "tiny.yaml"), "--stage", "cpt", *ONE_PROCESS,
                "stages.cpt.training.train_steps=30", "stages.cpt.training.lr_warmup_steps=3",
                f"checkpoint.save={root / 'ckpt'}", f"logging.output_dir={root / 'logs'}"])
    return root / "ckpt" / "cpt"


@pytest.fixture(scope="module")
def initial(tmp_path_factory) -> Path:
    """The tiny model's random initial weights (a save directory): activation probabilities spread out, where
    a briefly trained tiny model has many neurons firing on every token (95th percentile of p = 1)."""
    root = tmp_path_factory.mktemp("initial")
    run_medmoe(["train", str(REPO / "examples" / "tiny.yaml"), "--stage", "cpt", *ONE_PROCESS,
                "stages.cpt.training.train_steps=0", f"checkpoint.save={root / 'ckpt'}", f"logging.output_dir={root}"])
    return root / "ckpt" / "cpt"


def _data_args(*langs):
    return [arg for lang in langs for arg in ("--data", f"{lang}={TEXT / f'{lang}.jsonl'}")]


def _only_in(lang: str, others) -> list:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(TOKENIZER) / "tokenizer.json"))

    def ids(code):
        with open(TEXT / f"{code}.jsonl", encoding="utf-8") as f:
            return {i for line in f for i in tok.encode(json.loads(line)["text"], add_special_tokens=False).ids}
    return sorted(ids(lang) - set().union(*(ids(o) for o in others)))


def test_lape_finds_a_planted_neuron_and_tp2_agrees(initial, tmp_path):
    planted = tmp_path / "planted"
    zh_only = _only_in("zh", ["en", "fr"])
    subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "plant_neuron.py"), str(initial), str(planted),
                    "7", *map(str, zh_only)], check=True, cwd=REPO, env=cpu_env(), capture_output=True)
    sets = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        proc = run_medmoe(["analyze", "lape", "--ckpt", str(planted), *_data_args("en", "zh", "fr"),
                           "--output", str(out), "--tensor-parallel", str(tp), "--seq-length", "64"])
        assert "selected neurons" in proc.stdout
        sets[tp] = json.loads((out / "neurons.json").read_text(encoding="utf-8"))
    assert sets[1]["neurons"] == sets[2]["neurons"]
    layer1 = {lang: sets[1]["neurons"][lang].get("1", []) for lang in ("en", "zh", "fr")}  # layers count from 1
    assert 7 in layer1["zh"] and 7 not in layer1["en"] and 7 not in layer1["fr"], layer1
    with open(tmp_path / "tp1" / "counts.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["unit"] == "layer 1" and int(rows[0]["zh"]) >= 1
    assert (tmp_path / "tp1" / "counts.png").stat().st_size > 1000


def test_lape_perplexity_matrix(trained, tmp_path):
    run_medmoe(["analyze", "lape", "--ckpt", str(trained), *_data_args("en", "zh"), "--output", str(tmp_path),
                "--ppl-matrix", "--max-tokens", "600"])
    ppl = json.loads((tmp_path / "ppl.json").read_text(encoding="utf-8"))
    assert set(ppl["baseline"]) == {"en", "zh"} and all(v > 1 for v in ppl["baseline"].values())
    assert set(ppl["change"]) == {"en", "zh"} and set(ppl["change"]["zh"]) == {"en", "zh"}
    assert (tmp_path / "ppl_change.png").exists() and (tmp_path / "ppl_change.csv").exists()


def test_bad_analysis_input_is_named(trained, tmp_path):
    proc = run_medmoe(["analyze", "lape", "--ckpt", str(trained), "--data", "xx=nowhere.jsonl",
                       "--output", str(tmp_path / "o")], check=False)
    assert proc.returncode == 3 and "xx" in proc.stderr and not (tmp_path / "o").exists()
    proc = run_medmoe(["analyze", "routing", "--ckpt", str(tmp_path / "missing"), *_data_args("en"),
                       "--output", str(tmp_path / "o")], check=False)
    assert proc.returncode == 3 and "missing" in proc.stderr


def test_steering_zeroes_exactly_the_chosen_neurons(megatron_single_rank):
    import torch.nn.functional as F

    from conftest import tiny_config
    from megatron_medmoe.analysis.lape_stats import Unit
    from megatron_medmoe.analysis.neurons import Steering, swiglu_units
    from megatron_medmoe.data.batches import causal_mask
    from megatron_medmoe.model.gpt import build_model_chunks

    cfg = tiny_config("cpt", ONE_PROCESS, world_size=1)
    (model,) = build_model_chunks(cfg, 7)
    model.eval()
    units = swiglu_units(model)
    seen = {}
    hooks = [_capture_fc2_input(model, s, seen) for s in units]
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    run = lambda: model(tokens, torch.arange(16).expand(2, -1), causal_mask(16), family_ids=torch.zeros_like(tokens))  # noqa
    chosen, others = [3, 50, 175], [i for i in range(176) if i not in (3, 50, 175)]
    with torch.no_grad():
        run()
        base = dict(seen)
        with Steering(model, {Unit(2): (torch.tensor(chosen), None)}):  # the last dense layer
            run()
        assert (seen[Unit(2)][..., chosen] == 0).all() and (base[Unit(2)][..., chosen] != 0).all()
        assert torch.equal(seen[Unit(2)][..., others], base[Unit(2)][..., others])
        assert torch.equal(seen[Unit(1)], base[Unit(1)])  # before the steered layer: untouched
        gates = {}
        fc1 = units[1].fc1
        with Steering(model, {Unit(2): (torch.tensor([4, 9]), torch.tensor([0.25, -0.2], dtype=torch.float64))}):
            h = fc1.register_forward_hook(lambda m, a, out: gates.__setitem__("g", out[0][..., :176].clone()))
            run()
            h.remove()
    for hook in hooks:
        hook.remove()
    act = F.silu(gates["g"].double())
    assert torch.allclose(act[..., 4], torch.full_like(act[..., 4], 0.25), atol=1e-6)
    assert torch.allclose(act[..., 9], torch.full_like(act[..., 9], -0.2), atol=1e-6)


def _capture_fc2_input(model, slot, seen):
    mlp = _mlp_of(model, slot.fc1)
    return mlp.linear_fc2.register_forward_pre_hook(lambda m, args: seen.__setitem__(slot.unit, args[0].clone()))


def _mlp_of(model, fc1):
    return next(m for m in model.modules() if getattr(m, "linear_fc1", None) is fc1)


def _read_routing(out: Path):
    ratios = defaultdict(dict)
    with open(out / "routing.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            ratios[(row["language"], int(row["layer"]))][int(row["expert"])] = float(row["ratio"])
    return ratios


def test_routing_numbers_the_layers_as_the_training_metrics_do(megatron_single_rank, tmp_path):
    from conftest import tiny_config
    from megatron_medmoe.analysis.routing import RoutingCounter, write_routing
    from megatron_medmoe.data.batches import causal_mask
    from megatron_medmoe.languages import load_registry
    from megatron_medmoe.model.gpt import build_model_chunks
    from megatron_medmoe.training.metrics import TrainingMetrics

    cfg = tiny_config("cpt", [*ONE_PROCESS, f"logging.output_dir={tmp_path / 'logs'}"], world_size=1)
    registry = load_registry(cfg.data.language_table)
    (model,) = build_model_chunks(cfg, registry.num_experts)
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    family = torch.full_like(tokens, registry.expert_id("en"))
    run = lambda: model(tokens, torch.arange(16).expand(2, -1), causal_mask(16), family_ids=family)  # noqa
    model.train()
    run()  # builds a graph: the routers count it for the training metrics
    trained = sorted(int(layer) for layer in TrainingMetrics([model], registry, cfg).log(step=1, lr=1e-3)["moe_layers"])
    model.eval()
    counter = RoutingCounter(model, ["en"], registry.num_experts)
    counter.language, counter.family = "en", registry.expert_id("en")
    counter.family_of["en"] = counter.family
    with counter, torch.no_grad():
        run()
    write_routing(str(tmp_path / "routing"), counter, list(registry.experts))
    with open(tmp_path / "routing" / "routing.csv", encoding="utf-8") as f:
        analyzed = sorted({int(row["layer"]) for row in csv.DictReader(f)})
    with open(tmp_path / "routing" / "family_share.csv", encoding="utf-8") as f:
        assert sorted(int(row["layer"]) for row in csv.DictReader(f)) == analyzed
    assert trained == analyzed == [3, 4]  # the last 2 of 4 layers, numbered from 1 over the whole model


def test_routing_ratios_on_a_model_with_moe_in_every_layer(tmp_path):
    save = tmp_path / "ckpt"
    run_medmoe(["train", str(REPO / "examples" / "tiny.yaml"), "--stage", "cpt", *ONE_PROCESS, "moe.moe_last_n=4",
                "stages.cpt.training.train_steps=5", f"checkpoint.save={save}", f"logging.output_dir={tmp_path / 'l'}"])
    for routing in ("plain", "hard"):
        out = tmp_path / routing
        extra = ["--routing", "hard"] if routing == "hard" else []
        run_medmoe(["analyze", "routing", "--ckpt", str(save / "cpt"), *_data_args("en", "zh"), "--output", str(out),
                    "--max-tokens", "500", *extra])
        ratios = _read_routing(out)
        assert sorted({layer for _, layer in ratios}) == [1, 2, 3, 4]  # megatron-core's layer numbers
        for key, row in ratios.items():
            assert sum(row.values()) == pytest.approx(1.0, abs=1e-5), key
        assert (out / "routing_en.png").exists() and (out / "routing_zh.png").exists()
        if routing == "hard":  # each language forced to its family expert: zh -> 0 (Sino-Tibetan), en -> 4
            for layer in range(1, 5):
                assert ratios[("zh", layer)][0] == pytest.approx(1.0) and ratios[("en", layer)][4] == pytest.approx(1.0)
            with open(out / "family_share.csv", encoding="utf-8") as f:
                assert all(float(r["share"]) == 1.0 for r in csv.DictReader(f))


def test_lens_stage_trains_the_top_layers_only(trained, tmp_path, megatron_single_rank):
    from megatron_medmoe.convert.mcore_io import CheckpointTensors
    from megatron_medmoe.convert.verify import our_model
    from megatron_medmoe.training.checkpoint_paths import find_checkpoint

    run_medmoe(["train", str(REPO / "examples" / "lens.yaml"), f"stages.lens.checkpoint.load={trained}",
                f"checkpoint.save={tmp_path / 'ckpt'}", f"logging.output_dir={tmp_path / 'logs'}"])
    losses = [r["loss"] for r in read_metrics(tmp_path / "logs", "lens")]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    assert (tmp_path / "logs" / "lens" / "lens_subspaces.pt").exists()
    before, after = CheckpointTensors(find_checkpoint(str(trained))), CheckpointTensors(find_checkpoint(str(tmp_path / "ckpt" / "lens")))
    for key in before.keys():
        if key.startswith("decoder.layers.") and not key.endswith("_extra_state"):
            layer = int(key.split(".")[2])
            same = torch.equal(before[key], after[key])
            assert same == (layer < 2), key
        elif key.startswith(("embedding.", "decoder.final_layernorm", "output_layer")):
            assert torch.equal(before[key], after[key]), key
    # English next-token distributions stay close to the starting model's
    tokens = torch.tensor([_english_prompt_ids()])
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    from megatron_medmoe.data.batches import causal_mask

    with torch.no_grad():
        old, _ = our_model(str(trained))
        new, _ = our_model(str(tmp_path / "ckpt" / "lens"))
        p = torch.log_softmax(old(tokens, positions, causal_mask(tokens.shape[1])).double(), -1)
        q = torch.log_softmax(new(tokens, positions, causal_mask(tokens.shape[1])).double(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl < 0.05, kl


def _english_prompt_ids():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(TOKENIZER) / "tokenizer.json"))
    with open(REPO / "examples" / "data" / "lens" / "parallel.jsonl", encoding="utf-8") as f:
        text = json.loads(f.readline())["en"]
    return tok.encode(f"User:{text}\nAssistant:", add_special_tokens=False).ids


def test_mcq_generation_matches_transformers(trained, tmp_path):
    """Our greedy generation with a key/value cache writes the same answers as transformers' generate() on the
    exported model, and the accuracy is that of those answers."""
    from transformers import AutoModelForCausalLM

    from megatron_medmoe.evaluation.answers import extract_answer
    from megatron_medmoe.evaluation.prompts import build_prompt, choose_shots
    from megatron_medmoe.evaluation.questions import read_questions

    files = sorted(str(p) for p in (REPO / "examples" / "data" / "mcq").glob("*.jsonl"))
    run_medmoe(["convert", "mcore-to-hf", "--ckpt", str(trained), "--out", str(tmp_path / "hf"), "--format", "qwen2_moe",
                "--quiet"])
    proc = run_medmoe(["eval", "mcq", "--ckpt", str(trained), "--data", *files, "--limit", "1", "--max-new-tokens", "12",
                       "--output", str(tmp_path / "eval")])
    assert "major average over 6 languages" in proc.stdout and "minor average over 2 languages" in proc.stdout
    ours = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    pool = read_questions(files)
    shots, by_id = choose_shots(pool, 3, 0), {q.qid: q for q in pool}
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(TOKENIZER) / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    for record in ours:
        q = by_id[record["id"]]
        prompt = torch.tensor([tok.encode(build_prompt(q, shots[q.qid]), add_special_tokens=False).ids])
        out = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, prompt.shape[1]:]
        ids = [int(i) for i in out if int(i) != eos]
        text = tok.decode(ids).split("\nUser:")[0]
        assert record["output"] == text, (record["id"], record["output"], text)
        assert record["predicted"] == extract_answer(text, q.letters)
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text(encoding="utf-8"))
    assert scores["questions"] == len(ours) == 10 and scores["correct"] == sum(r["correct"] for r in ours)
    proc = run_medmoe(["eval", "mcq", "--ckpt", str(trained), "--data", *files, "--mode", "loglik"])
    assert "65 questions" in proc.stdout and "loglik" in proc.stdout
