"""`medmoe preprocess` on the ApolloMoE release's formats: a JSON array of `{"conversations", "source", "class"}`
items, the same records as Parquet (a `conversations` column of list<struct<from, value>>, as Hugging Face
datasets export them) and as JSONL give one and the same dataset; broken arrays stop with the item and byte;
the release's class is kept per document; the apollo recipe gives the release's priority and epochs per
source."""
import json
import signal

import numpy as np
import pytest

from conftest import REPO, TOKENIZER, run_medmoe
from megatron_medmoe.data.dataset import PreprocessedDataset
from megatron_medmoe.data.preprocess import PreprocessError, PreprocessOptions, run_preprocess

OUTPUTS = (".bin", ".idx", ".loss_mask.bin", ".loss_mask.idx", ".lang.npy", ".source.npy", ".class.npy")
SAMPLE = REPO / "examples" / "data" / "released" / "ApolloMoEDataset-sample.json"


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# released-shape items: sources named as the release names them, a multi-turn dialogue, one item without a
# class (allowed), text with escapes, brackets and quotes inside strings
RELEASED = [
    {"conversations": turns("What lowers a fever?", "Rest, fluids and paracetamol."), "source": "medicalWiki_en_qa",
     "class": "major"},
    {"conversations": turns("发烧怎么办？", "多喝水，注意休息。"), "source": "medicalExam_zh", "class": "major"},
    {"conversations": turns("Quote \"this\" [and] {that}?", "Back\\slash \\\" and a tab\there."),
     "source": "medicalBook_en_qa", "class": "major"},
    {"conversations": turns("Homa ni nini?", "Joto la mwili la juu.", "Nifanye nini?", "Kunywa maji."),
     "source": "general_sw", "class": "minor"},
    {"conversations": turns("def f(): pass — what is it?", "A Python function."), "source": "code_en"},
    {"conversations": turns("ما هو السكري؟", "ارتفاع السكر في الدم."), "source": "medicalPatient_ar",
     "class": "major"},
    {"conversations": turns("Emoji \U0001F600 ok?", "Yes."), "source": "medicalWeb_ja_qa", "class": "major"},
] * 3


def write_json(path, items, indent=None, ensure_ascii=False):
    path.write_text(json.dumps(items, ensure_ascii=ensure_ascii, indent=indent), encoding="utf-8")
    return path


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    return path


def write_parquet(path, items, row_group_size=4):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(items)  # what datasets.Dataset.from_list(items).to_parquet() writes
    assert str(table.schema.field("conversations").type) == "list<item: struct<from: string, value: string>>"
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def preprocess(path, prefix, **options):
    options.setdefault("fmt", "chat")
    return run_preprocess(PreprocessOptions(inputs=[str(path)], tokenizer=TOKENIZER, output_prefix=str(prefix),
                                            **options), progress=False)


def outputs(prefix):
    return {ext: open(f"{prefix}{ext}", "rb").read() for ext in OUTPUTS}


def comparable(summary):
    """The summary but for the input's name, the time taken and the number of workers."""
    options = {k: v for k, v in summary["options"].items() if k != "workers"}
    return {**{k: v for k, v in summary.items() if k not in ("inputs", "seconds")}, "options": options}


def test_json_array_parquet_and_jsonl_give_the_same_dataset(tmp_path):
    files = {"jsonl": write_jsonl(tmp_path / "records.jsonl", RELEASED),
             "json": write_json(tmp_path / "ApolloMoEDataset.json", RELEASED, indent=2, ensure_ascii=True),
             "parquet": write_parquet(tmp_path / "records.parquet", RELEASED)}
    results = {}
    for name, workers in (("jsonl", 1), ("json", 1), ("parquet", 1), ("json", 2), ("parquet", 2)):
        prefix = tmp_path / f"{name}{workers}"  # small chunks: many of them, items and row batches split across
        summary = preprocess(files[name], prefix, workers=workers, chunk_bytes=700)
        results[name, workers] = outputs(prefix), comparable(summary)
    for run in results:
        assert results[run] == results["jsonl", 1], run
    summary = results["json", 1][1]
    assert summary["documents"] == len(RELEASED) and summary["skipped"] == {}
    classes = np.asarray(summary["classes"], dtype=object)[np.load(tmp_path / "json1.class.npy")]
    assert classes.tolist() == [item.get("class") for item in RELEASED]
    dataset = PreprocessedDataset.open(str(tmp_path / "json1"))  # its arrays are views into maps it owns
    lengths = dataset.lengths.tolist()
    for name in ("major", "minor", None):
        counted = summary["per_class"][name] if name else summary["unclassified"]
        mine = [n for n, c in zip(lengths, classes.tolist()) if c == name]
        assert counted == {"documents": len(mine), "tokens": sum(mine)} and mine


def test_the_released_sample_and_its_summary_line(tmp_path):
    proc = run_medmoe(["preprocess", "--input", str(SAMPLE), "--tokenizer", TOKENIZER, "--format", "chat",
                       "--output-prefix", str(tmp_path / "sample")])
    summary = json.loads((tmp_path / "sample.json").read_text())
    items = json.loads(SAMPLE.read_text(encoding="utf-8"))
    assert summary["documents"] == len(items) and summary["classes"] == ["major", "minor"]
    assert {name: v["documents"] for name, v in summary["per_class"].items()} == \
        {c: sum(item["class"] == c for item in items) for c in ("major", "minor")}
    assert np.asarray(summary["sources"])[np.load(tmp_path / "sample.source.npy")].tolist() == \
        [item["source"] for item in items]
    major = summary["per_class"]["major"]
    assert any(line.split()[:3] == ["major", f"{major['documents']:,}", f"{major['tokens']:,}"]
               for line in proc.stdout.splitlines())


def test_array_scanner_finds_every_item_at_any_block_size(tmp_path):
    from megatron_medmoe.data.inputs import json_array_chunks

    items = [{"a": "x\\\"]}", "b": [1, [2, {"c": "\\\\"}], "]"]}, 7, "s\"t", None, [], {}, -1.5e3, True,
             {"k": "é\u2028\U0001F600", "q": "\\"}]
    for ensure_ascii in (False, True):
        text = " \n[ " + " ,\n ".join(json.dumps(item, ensure_ascii=ensure_ascii) for item in items) + " ] \n"
        (tmp_path / "a.json").write_text(text, encoding="utf-8")
        for block in [*range(1, 40), 64, 1000]:
            read = [(n, json.loads(raw)) for chunk in json_array_chunks(str(tmp_path / "a.json"), block)
                    for n, raw in chunk.items()]
            assert read == list(enumerate(items)), block


GOOD = json.dumps(RELEASED[0], ensure_ascii=False).encode()  # one item
N = len(GOOD)
# (file content, --on-error, the message after "FILE: "); skip where the structure is broken: that cannot be skipped
BROKEN = [
    (b"[" + GOOD + b", " + GOOD + b", " + GOOD[:30], "skip",
     "item 2, byte {size}: the file ends inside item 2 (the array is not closed): it is cut short"),
    (b"[" + GOOD + b", ", "skip", "item 1, byte {size}: the file ends before item 1 (the array is not closed)"),
    (GOOD + b"\n" + GOOD + b"\n", "skip", "item 0, byte 0: expected a JSON array of records ([{...}, ...]), found an "
     "object (one record per line, JSON Lines, as Megatron-LM's loose JSON? give --input-format jsonl)"),
    (b"[" + GOOD + b"] x", "skip", f"item 1, byte {N + 3}: data after the end of the array (which holds 1 item)"),
    (b"[" + GOOD + b" " + GOOD + b"]", "skip", f"item 1, byte {N + 2}: expected ',' or ']' after item 0"),
    (b"[" + GOOD + b', {"source": "x",}]', "skip", f"item 1, byte {N + 3}: malformed JSON (Expecting property name "
     "enclosed in double quotes, column 16); the array's structure is broken here"),
    (b"[" + GOOD + b", 7, " + GOOD + b"]", "fail", f"item 1, byte {N + 3}: expected a JSON object, got a number"),
    (b"[" + GOOD + b", " + GOOD.replace(b"fever", b"f\xe9ver") + b"]", "fail",
     f"item 1, byte {N + 3}: invalid UTF-8 at byte {GOOD.find(b'fever') + 1} of the record"),
]


@pytest.mark.parametrize("content, on_error, message", BROKEN, ids=["truncated_in_item", "truncated_after_comma",
                         "not_an_array", "trailing_garbage", "missing_comma", "malformed_item", "not_an_object",
                         "invalid_utf8"])
def test_a_broken_array_names_the_item_and_writes_nothing(tmp_path, content, on_error, message):
    path = tmp_path / "ApolloMoEDataset.json"
    path.write_bytes(content)
    message = message.replace("{size}", str(len(content)))
    proc = run_medmoe(["preprocess", "--input", str(path), "--tokenizer", TOKENIZER, "--format", "chat",
                       "--output-prefix", str(tmp_path / "out"), "--on-error", on_error, "--workers", "2",
                       "--quiet"], check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith(f"medmoe preprocess: {path}: {message}"), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing under the prefix, not even aside


def test_skipped_items_are_counted_by_reason(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"[" + b", ".join([GOOD, b"7", b'"text"', GOOD.replace(b"fever", b"f\xe9ver"), b"[]", GOOD,
                                        GOOD.replace(b'"major"', b"1")]) + b"]")
    summary = preprocess(path, tmp_path / "out", on_error="skip")
    assert summary["documents"] == 2 and summary["skipped"] == {"not_an_object": 3, "invalid_utf8": 1, "bad_class": 1}
    assert summary["skipped_examples"]["not_an_object"] == \
        f"{path}: item 1, byte {len(GOOD) + 3}: expected a JSON object, got a number"
    lines = tmp_path / "lines.json"  # JSON Lines named .json: read as such when told
    write_jsonl(lines, RELEASED[:3])
    with pytest.raises(PreprocessError, match="give --input-format jsonl"):
        preprocess(lines, tmp_path / "l")
    assert preprocess(lines, tmp_path / "l", input_format="jsonl")["documents"] == 3


def test_parquet_rows_are_named_and_unreadable_files_stop(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = [*RELEASED[:3], {"conversations": turns("Question only?"), "source": "medicalExam_en"}, RELEASED[0]]
    path = write_parquet(tmp_path / "a.parquet", items, row_group_size=2)
    with pytest.raises(PreprocessError, match=f"^{path}: row 3: conversation has no answer"):
        preprocess(path, tmp_path / "out")
    assert preprocess(path, tmp_path / "out", on_error="skip")["skipped"] == {"no_answer": 1}
    # a string column holding bytes that are not UTF-8 (written by a tool that did not check)
    offsets = pa.py_buffer(np.array([0, 5, 10], dtype=np.int32).tobytes())
    text = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"Wash.caf\xe9!")])
    pq.write_table(pa.table({"text": text, "lang": ["en", "fr"]}), tmp_path / "b.parquet")
    summary = preprocess(tmp_path / "b.parquet", tmp_path / "b", fmt="text", on_error="skip")
    assert summary["documents"] == 1 and summary["skipped"] == {"invalid_utf8": 1}
    assert summary["skipped_examples"]["invalid_utf8"].startswith(f"{tmp_path / 'b.parquet'}: row 1: invalid UTF-8")
    # columns no record field names are not read: the same bytes there refuse nothing
    pq.write_table(pa.table({"text": ["Wash.", "Lave."], "lang": ["en", "fr"], "notes": text}), tmp_path / "d.parquet")
    assert preprocess(tmp_path / "d.parquet", tmp_path / "d", fmt="text")["documents"] == 2
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PreprocessError, match=f"^{tmp_path / 'c.parquet'}: not a readable Parquet file"):
        preprocess(tmp_path / "c.parquet", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.glob("c.*")) == ["c.parquet"]  # nothing under the prefix
    # a row group damaged after the first one: stops where it can no longer be read, on one line
    damaged = bytearray(write_parquet(tmp_path / "e.parquet", RELEASED, row_group_size=8).read_bytes())
    page = pq.ParquetFile(tmp_path / "e.parquet").metadata.row_group(1).column(0).data_page_offset
    damaged[page:page + 64] = b"\xff" * 64
    (tmp_path / "e.parquet").write_bytes(bytes(damaged))
    with pytest.raises(PreprocessError, match=rf"^{tmp_path / 'e.parquet'}: row \d+: cannot read the file from here "
                       r"on \([^\n]+\)$"):
        preprocess(tmp_path / "e.parquet", tmp_path / "e", on_error="skip", chunk_bytes=500)


# The release's recipe (src/prepare/data_process_train_prodata_qwen2.py): every source it names, by kind.
RELEASE_KNOWLEDGE = {"medicalBook": "en ko ru zh", "medicalGuideline": "de en es fr ko zh",  # priority 16, epoch 1
                     "medicalPaper": "de en es fr ru zh", "medicalWeb": "de en es it ja ko pt ru zh",
                     "medicalWiki": "zh ar de en es fr hi it ja ko pt ru"}
RELEASE_OTHER = {"medicalExam": "de en zh fr es it ja ko ru", "medicalPatient": "ar en it ja ko pt zh ru",  # 2, 2
                 "general": "hi fr es en zh it ja ko pt de ar ru", "code": "en zh", "math": "en zh"}
RELEASE_PRIORITY = {**{f"{kind}_{lang}_qa": (16, 1) for kind, langs in RELEASE_KNOWLEDGE.items()
                       for lang in langs.split()},
                    **{f"{kind}_{lang}": (2, 2) for kind, langs in RELEASE_OTHER.items() for lang in langs.split()}}


def test_every_source_of_the_release_gets_its_priority_epochs_and_language():
    from megatron_medmoe.config.schema import DataConfig
    from megatron_medmoe.data.blending import knowledge_mask
    from megatron_medmoe.data.records import source_language
    from megatron_medmoe.languages import load_registry

    data, registry = DataConfig(), load_registry("families")
    names = np.asarray(sorted(RELEASE_PRIORITY), dtype=object)
    assert len(names) == 70
    ours = {name: (data.knowledge_priority, data.knowledge_epochs) if knowledge else
            (data.other_priority, data.other_epochs) for name, knowledge in
            zip(names, knowledge_mask(names, data.knowledge_sources).tolist())}
    assert ours == RELEASE_PRIORITY
    assert {registry.canonical_code(source_language(name)) for name in names} == \
        {"en", "zh", "ko", "ru", "de", "es", "fr", "it", "ja", "pt", "ar", "hi"}


def test_apollo_plan_on_a_released_array_follows_the_release(tmp_path):
    """Pool: every document once per epoch of its source; order: weighted by its source's priority."""
    from megatron_medmoe.config.schema import DataConfig
    from megatron_medmoe.data.blending import apollo_plan
    from megatron_medmoe.data.dataset import PreprocessedDataset

    sizes = {"medicalWiki_en_qa": 12, "medicalBook_zh_qa": 8, "medicalExam_ko": 6, "general_ar": 4, "code_en": 3,
             "math_zh": 2, "medicalPatient_ja": 5}
    items = [{"conversations": turns(f"Question {k} of {source}?", f"Answer {k}."), "source": source,
              "class": "major"} for source, n in sizes.items() for k in range(n)]
    preprocess(write_json(tmp_path / "ApolloMoEDataset.json", items), tmp_path / "released")
    sources = PreprocessedDataset.open(str(tmp_path / "released")).sources()
    data = DataConfig()

    def plan(seed):
        return apollo_plan([sources], seed, data.knowledge_sources, data.knowledge_priority, data.knowledge_epochs,
                           data.other_priority, data.other_epochs)

    pool = sum(n * RELEASE_PRIORITY[s][1] for s, n in sizes.items())
    datasets, docs = next(plan(0))
    assert len(docs) == pool and set(datasets.tolist()) == {0}  # the first block is one whole pass here
    drawn = np.unique(docs, return_counts=True)
    assert drawn[0].tolist() == list(range(len(items)))
    assert all(count == RELEASE_PRIORITY[sources[doc]][1] for doc, count in zip(*drawn))
    # the first draw of a pass picks a source with probability priority x documents x epochs / total
    weight = {s: RELEASE_PRIORITY[s][0] * RELEASE_PRIORITY[s][1] * n for s, n in sizes.items()}
    knowledge = sum(w for s, w in weight.items() if s.endswith("_qa")) / sum(weight.values())
    firsts = [sources[next(plan(seed))[1][0]].endswith("_qa") for seed in range(2000)]
    assert abs(np.mean(firsts) - knowledge) < 0.03, (np.mean(firsts), knowledge)


def test_a_stopped_json_array_run_leaves_nothing(tmp_path):
    from test_preprocess import assert_nothing_survives, start_mid_run

    corpus = tmp_path / "data" / "big.json"
    corpus.parent.mkdir()
    with open(corpus, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps({"text": f"Document {i}: wash hands with soap and clean water. " * 3,
                                               "lang": "en"}) for i in range(60000)) + "\n]\n")
    out = tmp_path / "out"
    out.mkdir()
    proc, children = start_mid_run(corpus, out / "ds", 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err == f"medmoe preprocess: stopped by SIGTERM; nothing was written under {out / 'ds'}\n"
    assert_nothing_survives(out, children)
