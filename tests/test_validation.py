"""Validation during training: which documents are held out (and never trained on), the validation rows, the
config rules, the records; and, in real `medmoe train` processes, that a run with validation trains bitwise as
one without (tests/test_layouts.py checks that the validation loss under TP 2, PP 2, EP 2 ... equals one
process's); the multiple-choice dev-set accuracy during training equals `medmoe eval mcq`'s."""
import numpy as np
import pytest

from conftest import REPO, TINY_DATA, read_metrics, run_medmoe, tiny_config, train_stage
from megatron_medmoe.config import ConfigError, resolve_config
from megatron_medmoe.data.holdout import held_out_count, split_documents
from megatron_medmoe.data.loader import TrainingData
from megatron_medmoe.data.packing import pack
from megatron_medmoe.data.validation import ValidationData, validation_plan
from megatron_medmoe.languages import load_registry
from megatron_medmoe.training.loggers import _scalars

CHAT = str(TINY_DATA["chat"])


def used_documents(builder, datasets):
    """(prefix, original document index) of every document piece in the builder's rows."""
    seg = builder.segments
    return {(datasets[d].prefix, int(datasets[d].documents[i])) for d, i in zip(seg.dataset.tolist(), seg.doc.tolist())}


def test_held_out_documents_are_seeded_and_never_trained_on():
    cfg = tiny_config("sft", ["data.validation_fraction=0.2", "training.eval_iters=1000"])
    registry = load_registry()
    data = TrainingData(cfg, registry, total_rows=4000)  # many passes over the training documents
    validation = ValidationData(cfg, registry, data.datasets, data.held_out)
    trained = used_documents(data.builder, data.datasets)
    held = {(CHAT, int(i)) for i in data.held_out[0].documents}
    documents = len(data.datasets[0]) + len(data.held_out[0])
    assert len(held) == held_out_count(documents, 0.2) == round(0.2 * documents)
    assert not trained & held
    assert len(trained) == documents - len(held)  # everything else is trained on
    assert used_documents(validation.builder, validation.datasets) == held  # each held-out document validates
    again = TrainingData(cfg, registry, total_rows=4000)
    assert np.array_equal(again.held_out[0].documents, data.held_out[0].documents)
    other = split_documents(documents, 0.2, cfg.training.seed + 1, 0)[1]
    assert not np.array_equal(other, data.held_out[0].documents)  # the seed chooses


def test_held_out_count_keeps_one_of_each():
    assert held_out_count(100, 0.0) == 0
    assert held_out_count(100, 0.001) == 1  # something is held out
    assert held_out_count(10, 0.99) == 9  # something is left to train on
    with pytest.raises(Exception, match="needs at least 2"):
        from megatron_medmoe.data.holdout import hold_out
        hold_out([type("One", (), {"__len__": lambda self: 1, "prefix": "p"})()], 0.5, 0)


def test_validation_rows_cover_each_document_once_and_pad_the_last_batch():
    cfg = tiny_config("sft", [f"data.validation=[{{prefix: {CHAT}}}]", "training.eval_iters=1000",
                              "training.global_batch_size=16", "training.micro_batch_size=4"])
    registry = load_registry()
    data = TrainingData(cfg, registry, total_rows=16)
    validation = ValidationData(cfg, registry, data.datasets, data.held_out)
    dataset = validation.datasets[0]
    seg = validation.builder.segments
    pieces = {}
    for doc, length in zip(seg.doc.tolist(), seg.length.tolist()):
        pieces[doc] = pieces.get(doc, 0) + length
    assert pieces == {i: int(n) for i, n in enumerate(dataset.lengths)}  # every token of every document, once
    assert validation.iterations == -(-validation.rows // 16)
    last = validation.iterations - 1
    rows = [b for rank in range(2) for b in validation.micro_batches(last, rank, 2)]
    padded = 16 * validation.iterations - validation.rows
    masks = [row.sum().item() for b in rows for row in b["loss_mask"]]
    assert len(masks) == 16 and masks[len(masks) - padded:] == [0.0] * padded
    # the same rows at every validation
    again = ValidationData(cfg, registry, data.datasets, data.held_out)
    assert all(np.array_equal(getattr(seg, k), getattr(again.builder.segments, k)) for k in ("doc", "start", "length"))


def test_a_finite_plan_keeps_its_last_partial_row():
    rows = pack(validation_plan([3], seed=0), [np.array([5, 5, 5])], seq_length=8, num_rows=100)
    assert rows.num_rows == 3 and int(np.sum(rows.length)) == 15


def test_config_rules():
    cfg = tiny_config("cpt")
    for overrides, message in [
        ({"eval_interval": 5}, "training.eval_interval: there is no validation data"),
        ({"eval_interval": 0, "fraction": 0.1}, "training.eval_interval must be at least 1"),
        ({"eval_iters": 0, "fraction": 0.1}, "training.eval_iters must be at least 1"),
        ({"fraction": 1.0}, r"data.validation_fraction must be in \[0, 1\)"),
    ]:
        bad = tiny_config("cpt")
        bad.training.eval_interval = overrides.get("eval_interval")
        bad.training.eval_iters = overrides.get("eval_iters", 10)
        bad.data.validation_fraction = overrides.get("fraction", 0.0)
        with pytest.raises(ConfigError, match=message):
            resolve_config(bad)
    cfg.data.validation = [type(cfg.data.datasets[0])(prefix="runs/data/nothing_here")]
    with pytest.raises(ConfigError, match=r"data.validation\[0\].prefix: 'runs/data/nothing_here' is not a preprocessed"):
        resolve_config(cfg)


def test_validation_records_reach_tensorboard_and_wandb_as_scalars():
    record = {"step": 4, "validation": {"loss": 2.0, "ppl": 7.39, "tokens": 10, "seconds": 0.1,
                                        "family_loss": {"Altaic": 2.5}, "family_tokens": {"Altaic": 10}}}
    assert _scalars(record) == {"validation/loss": 2.0, "validation/ppl": 7.39, "validation/family_loss/Altaic": 2.5}


@pytest.mark.multiprocess
def test_training_with_validation_is_bitwise_training_without(tmp_path):
    """EP 2 (the tiny recipe's layout), validation after every step vs none: the same training records to the bit;
    the last step's validation (due at its interval and as the stage's final one) is recorded once."""
    common = ["training.train_steps=4", "logging.log_interval=1", "checkpoint.save=null"]
    run_medmoe(train_stage("cpt", *common, f"logging.output_dir={tmp_path / 'plain'}"))
    validating = [f"data.validation=[{{prefix: {CHAT}}}]", "training.eval_iters=1", "training.eval_interval=1"]
    proc = run_medmoe(train_stage("cpt", *common, *validating, f"logging.output_dir={tmp_path / 'every'}"))
    assert "validation: 1 validation dataset(s)" in proc.stdout and "validation at step      4 | loss" in proc.stdout

    def split(name):
        records = read_metrics(tmp_path / name, "cpt")
        drop = ("tokens_per_s", "tflops_per_device", "mfu", "s_per_step")  # timings
        training = [{k: v for k, v in r.items() if k not in drop} for r in records if "loss" in r]
        return training, [(r["step"], r["validation"]) for r in records if "validation" in r]

    plain, none = split("plain")
    every, validations = split("every")
    assert none == [] and len(plain) == 4
    assert every == plain  # bitwise: floats compared exactly
    assert [step for step, _ in validations] == [1, 2, 3, 4]
    losses = [v["loss"] for _, v in validations]
    assert losses[-1] < losses[0] and set(validations[0][1]["family_loss"]) <= set(load_registry().experts)
    assert validations[0][1]["tokens"] == sum(validations[0][1]["family_tokens"].values()) > 0


MCQ = [str(REPO / "examples" / "data" / "mcq" / f"{code}.jsonl") for code in ("en", "sw", "zh")]


@pytest.mark.multiprocess
def test_mcq_dev_accuracy_during_training_is_what_eval_mcq_finds(tmp_path):
    """The dev-set accuracy after the stage's last step (EP 2: two data-parallel ranks score their share of the
    rows) equals `medmoe eval mcq --mode loglik` on the checkpoint saved at that step, language by language, with
    the same shots (training.seed). (Forward-only scoring under PP and TP is the validation's, test_layouts.)"""
    proc = run_medmoe(train_stage("sft", f"data.mcq_dev=[{','.join(MCQ)}]", "training.mcq_shots=1",
                                  "data.seq_length=512", "training.train_steps=2", "checkpoint.load=null",
                                  f"checkpoint.save={tmp_path / 'ckpt'}", f"logging.output_dir={tmp_path / 'ep2'}"))
    assert "mcq dev: 30 questions from 3 file(s), 1 shots" in proc.stdout and "keep their end" not in proc.stdout
    records = [r for r in read_metrics(tmp_path / "ep2", "sft") if "mcq_dev" in r]
    assert [r["step"] for r in records] == [2]
    last = records[-1]["mcq_dev"]
    assert last["questions"] == 30 and last["truncated"] == 0
    run_medmoe(["eval", "mcq", "--ckpt", str(tmp_path / "ckpt" / "sft"), "--data", *MCQ, "--mode", "loglik",
                "--shots", "1", "--seed", str(tiny_config("sft").training.seed), "--output", str(tmp_path / "eval")])
    import json

    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert {code: s["accuracy"] for code, s in scores["per_language"].items()} == pytest.approx(last["per_language"])
    assert scores["major_average"] == pytest.approx(last["major_average"])


def test_mcq_dev_config_rules():
    bad = tiny_config("sft")
    bad.training.mcq_eval_interval = 2
    with pytest.raises(ConfigError, match="training.mcq_eval_interval: there are no dev questions"):
        resolve_config(bad)
    bad.data.mcq_dev = ["examples/data/mcq/none.jsonl"]
    with pytest.raises(ConfigError, match=r"data.mcq_dev\[0\]: no such question file"):
        resolve_config(bad)
