"""Training data: packing, row contents (labels, loss masks, family ids, positions, attention), blending
recipes, data-parallel splits and exact resume."""
import collections
import itertools

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_config
from megatron_medmoe.data.batches import RowBuilder, causal_mask, document_mask, rows_of_batch
from megatron_medmoe.data.blending import apollo_plan, knowledge_mask, language_shares, temperature_plan, weighted_plan
from megatron_medmoe.data.dataset import PreprocessedDataset
from megatron_medmoe.data.loader import TrainingData
from megatron_medmoe.data.packing import pack
from megatron_medmoe.languages import load_registry


def fixed_plan(pairs):
    arr = np.asarray(pairs, dtype=np.int64)
    while True:
        yield arr[:, 0], arr[:, 1]


def take(plan, n):
    ds, doc = zip(*itertools.islice(((d, i) for a, b in plan for d, i in zip(a.tolist(), b.tolist())), n))
    return np.array(ds), np.array(doc)


# ---- packing

def test_packing_rules():
    lengths = [np.array([5, 9, 2, 30, 3])]
    rows = pack(fixed_plan([(0, i) for i in range(5)]), lengths, seq_length=8, num_rows=9)
    got = [list(rows.segments(r)) for r in range(rows.num_rows)]
    assert got[0] == [(0, 0, 0, 5), (0, 1, 0, 3)]  # 9 > 8: a long document fills the row and continues
    assert got[1] == [(0, 1, 3, 6), (0, 2, 0, 2)]
    assert got[2:6] == [[(0, 3, 0, 8)], [(0, 3, 8, 8)], [(0, 3, 16, 8)], [(0, 3, 24, 6)]]
    assert got[6] == [(0, 4, 0, 3), (0, 0, 0, 5)]  # 3 does not fit after 6: row 5 is padded, 3 starts row 6


@pytest.mark.parametrize("packing", ["whole_documents", "continuous"])
def test_packing_never_drops_a_token(packing):
    rng = np.random.default_rng(0)
    lengths = [rng.integers(1, 300, size=200)]
    rows = pack(fixed_plan([(0, i) for i in range(200)]), lengths, 64, 2000, packing)
    pieces = [seg for r in range(rows.num_rows) for seg in rows.segments(r)]
    assert all(sum(length for *_, length in rows.segments(r)) <= 64 for r in range(rows.num_rows))
    expected_doc, at = 0, 0  # the plan's documents, each from token 0 to its end, in order, twice and more
    for _, doc, start, length in pieces:
        assert (doc, start) == (expected_doc, at)
        at += length
        if at == lengths[0][doc]:
            expected_doc, at = (doc + 1) % 200, 0
    assert len({p[1] for p in pieces}) == 200
    fills = [sum(length for *_, length in rows.segments(r)) for r in range(rows.num_rows)]
    if packing == "continuous":
        assert set(fills) == {64}  # no padding at all


# ---- rows

class FakeDataset:
    """Documents given as token lists (and loss masks), as PreprocessedDataset.read serves them."""

    def __init__(self, docs, masks=None):
        self.docs, self.masks = docs, masks
        self.lengths = np.array([len(d) for d in docs])

    def read(self, doc, start, length):
        tokens = np.array(self.docs[doc][start:start + length], dtype=np.int64)
        mask = np.ones(length, np.float32) if self.masks is None else \
            np.array(self.masks[doc][start:start + length], np.float32)
        return tokens, mask


def builder(docs, families, seq, attention="shared", masks=None, order=None):
    ds = FakeDataset(docs, masks)
    plan = fixed_plan([(0, i) for i in (order or range(len(docs)))])
    return RowBuilder([ds], [np.array(families)], pack(plan, [ds.lengths], seq, 4), seq, attention, pad_id=0)


def test_row_labels_stay_inside_documents_and_padding_has_no_loss():
    b = builder([[11, 12, 13, 99], [21, 22, 99]], families=[4, 6], seq=8)
    row = b.row(0)
    assert row["tokens"].tolist() == [11, 12, 13, 99, 21, 22, 99, 0]
    assert row["labels"][:3].tolist() == [12, 13, 99] and row["labels"][4:6].tolist() == [22, 99]
    assert row["loss_mask"].tolist() == [1, 1, 1, 0, 1, 1, 0, 0]  # no label across documents, none on padding
    assert row["family_ids"].tolist() == [4, 4, 4, 4, 6, 6, 6, 6]  # padding: the last document's family
    assert row["position_ids"].tolist() == list(range(8))  # shared attention: positions run through the row


def test_a_document_continued_in_the_next_row_keeps_its_last_label():
    b = builder([[1, 2, 3, 4, 5, 6, 7]], families=[2], seq=4)
    first, second = b.row(0), b.row(1)
    assert first["tokens"].tolist() == [1, 2, 3, 4] and first["labels"].tolist() == [2, 3, 4, 5]
    assert first["loss_mask"].tolist() == [1, 1, 1, 1]
    # the document ends at 7; the plan's next document (the same one again) starts in the free slot
    assert second["tokens"].tolist() == [5, 6, 7, 1] and second["loss_mask"].tolist() == [1, 1, 0, 1]


def test_chat_loss_mask_is_the_label_tokens_mask():
    b = builder([[5, 6, 7, 8, 9]], families=[0], seq=8, masks=[[0, 0, 1, 1, 1]])
    row = b.row(0)
    assert row["loss_mask"][:5].tolist() == [0, 1, 1, 1, 0]  # label 6 is prompt; 7, 8, 9 are answer


def test_per_document_attention_and_positions():
    b = builder([[11, 12, 13], [21, 22]], families=[1, 2], seq=6, attention="per_document")
    row = b.row(0)
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 0]
    mask = document_mask(torch.from_numpy(row["piece"])[None])[0, 0]
    allowed = (~mask).int().tolist()
    assert allowed[4] == [0, 0, 0, 1, 1, 0]  # the second document sees itself only, causally
    assert allowed[2] == [1, 1, 1, 0, 0, 0]
    shared = (~causal_mask(6)[0, 0]).int().tolist()
    assert shared[4] == [1, 1, 1, 1, 1, 0]


# ---- blending

def test_weighted_blend_follows_the_weights():
    ds, _ = take(weighted_plan([100, 50, 10], [3.0, 1.0, 1.0], seed=1), 5000)
    shares = np.bincount(ds, minlength=3) / 5000
    assert shares == pytest.approx([0.6, 0.2, 0.2], abs=0.001)


def test_weighted_blend_visits_every_document_before_repeating():
    ds, doc = take(weighted_plan([7], [1.0], seed=3), 14)
    assert sorted(doc[:7].tolist()) == list(range(7)) and sorted(doc[7:].tolist()) == list(range(7))
    assert doc[:7].tolist() != doc[7:].tolist()  # a fresh permutation each pass


def test_apollo_recipe_priorities_and_epochs():
    sources = np.array(["medicalWiki_en_qa"] * 100 + ["medicalExam_en"] * 100, dtype=object)
    assert knowledge_mask(sources, ["*_qa"]).sum() == 100
    ds, doc = take(apollo_plan([sources], seed=0, knowledge_patterns=["*_qa"], knowledge_priority=16,
                               knowledge_epochs=1, other_priority=2, other_epochs=2), 300)
    counts = collections.Counter(doc.tolist())
    assert all(counts[i] == 1 for i in range(100)) and all(counts[i] == 2 for i in range(100, 200))
    knowledge_positions = np.flatnonzero(doc < 100)
    exam_positions = np.flatnonzero(doc >= 100)
    assert knowledge_positions.mean() < 0.5 * exam_positions.mean()  # most knowledge early, exams late
    again, _ = take(apollo_plan([sources], 0, ["*_qa"], 16, 1, 2, 2), 300)
    other_seed = take(apollo_plan([sources], 1, ["*_qa"], 16, 1, 2, 2), 300)[1]
    assert np.array_equal(take(apollo_plan([sources], 0, ["*_qa"], 16, 1, 2, 2), 300)[1], doc)
    assert not np.array_equal(other_seed, doc)


def test_temperature_sampling_over_languages():
    langs = [np.array(["en"] * 90 + ["sw"] * 10, dtype=object)]
    lengths = [np.full(100, 10)]
    shares = language_shares(langs, lengths, alpha=0.5)
    assert shares == pytest.approx({"en": 30 / 40, "sw": 10 / 40})  # sqrt(900) : sqrt(100)
    ds, doc = take(temperature_plan(langs, lengths, alpha=0.5, seed=0), 4000)
    assert np.mean(doc >= 90) == pytest.approx(0.25, abs=0.01)  # Swahili up from 10% to 25%


# ---- the run's data

@pytest.fixture(scope="module")
def sft_data():
    cfg = tiny_config("sft", ["training.train_steps=6", "parallel.data=2", "checkpoint.load=null"])
    return cfg, TrainingData(cfg, load_registry())


def test_data_parallel_ranks_read_disjoint_rows_covering_the_batch():
    a, b = rows_of_batch(48, 16, 0, 2), rows_of_batch(48, 16, 1, 2)
    assert set(a).isdisjoint(b) and sorted([*a, *b]) == list(range(48, 64))


def test_resume_reads_exactly_the_same_micro_batches(sft_data):
    cfg, data = sft_data
    _, again = cfg, TrainingData(cfg, load_registry())
    first = [data.micro_batches(step * 16, 1, 2) for step in range(6)][5]
    resumed = again.micro_batches(5 * 16, 1, 2)  # a fresh process at step 5 (data position: row 80)
    for x, y in zip(first, resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_sft_rows_train_on_answers_only(sft_data):
    _, data = sft_data
    batch = data.micro_batches(0, 0, 2)[0]
    share = float(batch["loss_mask"].mean())
    assert 0.1 < share < 0.9  # prompts (User: ... Assistant:) carry no loss
    assert batch["family_ids"].unique().numel() > 1  # packed rows mix languages
    assert batch["attention_mask"].shape == (1, 1, 128, 128)


def test_cpt_rows_train_on_every_token():
    cfg = tiny_config("cpt", ["training.train_steps=2", "parallel.data=2"])
    batch = TrainingData(cfg, load_registry()).micro_batches(0, 0, 2)[0]
    pieces_end = (batch["labels"] == 0) & (batch["loss_mask"] == 0)  # document ends and padding
    assert float(batch["loss_mask"].mean()) > 0.95 and bool(pieces_end.any())  # continuous packing: no padding


def test_dataset_language_must_be_in_the_runs_table():
    ds = PreprocessedDataset.open(str(REPO / "runs" / "data" / "tiny_text"))
    with pytest.raises(Exception, match="unknown language code 'ceb'"):
        ds.family_ids(load_registry("languages12"))
    assert set(ds.family_ids(load_registry("families")).tolist()) == set(range(7))


def test_dali_loader_serves_the_same_batches(sft_data):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install -e .[dali])")
    from megatron_medmoe.data.dali_loader import DaliLoader

    cfg, data = sft_data
    tr = cfg.training
    dali = DaliLoader(data.builder, tr.global_batch_size, tr.micro_batch_size, 1, 2, first_row=32)
    for row in (32, 48, 64):
        for ours, theirs in zip(data.micro_batches(row, 1, 2), dali.micro_batches(row, 1, 2)):
            assert set(ours) == set(theirs)
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), row
    with pytest.raises(RuntimeError, match="expected the one at row 80"):
        dali.micro_batches(48, 1, 2)
