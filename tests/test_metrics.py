"""The metrics people watch, checked against hand computations on one fixed batch: loss per language family
(cross-entropy from the model's logits, grouped by the batch's family ids and loss mask), each MoE layer's
share of tokens per expert (counted from the routers' decisions; the shares sum to 1) and how often the
router's own top-k already held the family expert; plus the TensorBoard and Weights & Biases outputs."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import read_metrics, run_medmoe, tiny_config, train_stage
from megatron_medmoe.data.loader import TrainingData
from megatron_medmoe.languages import load_registry
from megatron_medmoe.model.gpt import build_model_chunks
from megatron_medmoe.model.router import FamilyRouter
from megatron_medmoe.training.metrics import TrainingMetrics
from megatron_medmoe.training.step import make_forward_step


@pytest.fixture(scope="module")
def one_batch(megatron_single_rank, tmp_path_factory):
    out = tmp_path_factory.mktemp("metrics")
    cfg = tiny_config("sft", ["parallel.expert=1", "moe.expert_slots=null", "training.micro_batch_size=8",
                              "training.global_batch_size=8", f"logging.output_dir={out}"], world_size=1)
    registry = load_registry(cfg.data.language_table)
    torch.manual_seed(0)
    (model,) = build_model_chunks(cfg, registry.num_experts)
    model.train()  # hybrid routing: the family expert is forced in
    (batch,) = TrainingData(cfg, registry, total_rows=8).micro_batches(0, 0, 1)

    seen = {}  # per router: its input and its routing map, as the layer saw them

    def record_router(module, args, out):  # returns None: the router's output stays what it was
        seen.setdefault(module.layer_number, (args, out))

    hooks = [r.register_forward_hook(record_router) for r in model.modules() if isinstance(r, FamilyRouter)]
    output, loss_func = make_forward_step(registry.num_experts)(iter([batch]), model)
    _, _, report = loss_func(output)
    for h in hooks:
        h.remove()
    with torch.no_grad():  # not counted by the routers: only passes that build a graph are
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], family_ids=batch["family_ids"])
    metrics = TrainingMetrics([model], registry, cfg)
    metrics.add_step(report, grad_norm=1.0, updated=True, tokens=batch["tokens"].numel())
    record = metrics.log(step=1, lr=1e-3)
    return cfg, registry, model, batch, logits, seen, record


def test_family_loss_is_the_hand_computed_cross_entropy(one_batch):
    cfg, registry, _, batch, logits, _, record = one_batch
    ce = F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="none")
    mask = batch["loss_mask"].reshape(-1) > 0
    ids = batch["family_ids"].reshape(-1)
    hand = {registry.experts[f]: float(ce[mask & (ids == f)].mean()) for f in range(registry.num_experts)
            if bool((mask & (ids == f)).any())}
    assert len(hand) >= 3, "the batch should mix families"
    assert record["family_loss"].keys() == hand.keys()
    for family, value in hand.items():
        assert record["family_loss"][family] == pytest.approx(value, rel=1e-5), family
    assert record["loss"] == pytest.approx(float(ce[mask].mean()), rel=1e-5)
    assert mask.sum() < mask.numel()  # answers only: the mask matters


def test_expert_shares_and_forcing_rate_from_the_routers_decisions(one_batch):
    cfg, registry, _, batch, _, seen, record = one_batch
    layers = record["moe_layers"]
    assert sorted(layers) == ["3", "4"]
    tokens = batch["tokens"].numel()
    for number, ((hidden, family_ids), (_, routing_map)) in seen.items():
        entry = layers[str(number)]
        counts = routing_map.sum(dim=0).double()
        assert float(counts.sum()) == cfg.moe.topk * tokens  # every token goes to exactly k experts
        assert entry["expert_share"] == pytest.approx((counts / counts.sum()).tolist(), abs=1e-4)
        assert sum(entry["expert_share"]) == pytest.approx(1.0, abs=1e-3)
        assert entry["imbalance"] == pytest.approx(float(counts.max() / counts.mean()), rel=1e-6)
        # the router's own top-k, before forcing: softmax of its gate, top 2, family among them?
        router = next(m for m in one_batch[2].modules() if isinstance(m, FamilyRouter) and m.layer_number == number)
        with torch.no_grad():
            own = torch.softmax(hidden.float() @ router.weight.float().t(), dim=-1).reshape(-1, 7).topk(2).indices
        held = (own == family_ids.reshape(-1, 1)).any(dim=-1).double().mean()
        assert entry["family_in_own_topk"] == pytest.approx(float(held), abs=1e-9)


def test_a_resumed_run_supersedes_the_records_after_its_checkpoint(megatron_single_rank, tmp_path):
    cfg = tiny_config("cpt", ["parallel.expert=1", "moe.expert_slots=null", f"logging.output_dir={tmp_path}"],
                      world_size=1)
    out = tmp_path / "cpt"  # the stage's output directory
    out.mkdir()
    path = out / "metrics.jsonl"
    before = [json.dumps({"step": step, "loss": 10.0 - step / 10}) + "\n" for step in range(1, 51)]
    path.write_text("".join(before) + '{"step": 51, "lo', encoding="utf-8")  # the crash tore the last line
    metrics = TrainingMetrics([], load_registry(cfg.data.language_table), cfg, resumed=True, resumed_at=40)
    assert path.read_text(encoding="utf-8") == "".join(before[:40])  # steps 1-40 as they were
    metrics.add_step({}, grad_norm=1.0, updated=True, tokens=8)
    metrics.log(step=41, lr=1e-3)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 42))
    assert os.listdir(out) == ["metrics.jsonl"]  # no temporary file left


def test_tensorboard_discards_the_events_after_the_resume_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_medmoe.config import RunConfig
    from megatron_medmoe.training.loggers import TensorBoardWriter

    cfg = RunConfig()
    cfg.logging.output_dir = str(tmp_path)
    for resumed_at, steps, loss in ((None, range(1, 51), 1.0), (40, range(41, 43), 2.0)):
        writer = TensorBoardWriter(cfg, resumed_at=resumed_at)
        for step in steps:
            writer.write({"step": step, "loss": loss})
        writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, 1.0) for s in range(1, 41)] + [(41, 2.0),
                                                                                                      (42, 2.0)]


def test_a_resumed_wandb_run_joins_the_group_and_says_where_it_resumed(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from megatron_medmoe.config import RunConfig
    from megatron_medmoe.training.loggers import WandbWriter

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = RunConfig()
    cfg.logging.output_dir = str(tmp_path / "cpt")
    writer = WandbWriter(cfg, {"training": {"train_steps": 50}}, resumed_at=40)
    try:
        assert (writer.run.group, writer.run.name) == ("cpt", "cpt-from-step-41")
        assert writer.run.config["resumed_at"] == 40 and writer.run.config["training"] == {"train_steps": 50}
    finally:
        writer.close()


@pytest.mark.multiprocess
def test_tensorboard_and_wandb_offline_and_the_key_is_never_written(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    key = "0123456789abcdef0123456789abcdef01234567"
    out = tmp_path / "out"
    run_medmoe(train_stage("cpt", "training.train_steps=4", "logging.log_interval=2", "logging.tensorboard=true",
                           "logging.wandb=true", f"checkpoint.save={tmp_path / 'ckpt'}", f"logging.output_dir={out}"),
               WANDB_API_KEY=key, WANDB_MODE="offline")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "cpt" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "family_loss/Indo-European",
            "moe/layer3/imbalance"} <= set(tags), tags
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == [2, 4]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in read_metrics(out, "cpt")])
    runs = list((out / "cpt" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "an offline W&B run"
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert key.encode() not in f.read(), f"the W&B key was written to {name}"
