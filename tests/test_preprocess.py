"""`medmoe preprocess`: megatron-core-readable output, languages per document, chat loss masks, every kind
of bad input with --on-error fail and skip, nothing half-written."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TOKENIZER, cpu_env, run_medmoe
from megatron_medmoe.data.indexed import DTYPE_CODES, INDEX_HEADER, StreamingIndexedWriter
from megatron_medmoe.data.preprocess import PreprocessError, PreprocessOptions, run_preprocess


def preprocess(tmp_path, lines, fmt="text", name="in.jsonl", **options):
    path = tmp_path / name
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (line + "\n").encode() for line in lines))
    prefix = str(tmp_path / "out")
    summary = run_preprocess(PreprocessOptions(inputs=[str(path)], tokenizer=TOKENIZER, output_prefix=prefix,
                                               fmt=fmt, **options), progress=False)
    return prefix, summary


def documents(prefix):
    """Every document, copied out (megatron-core's IndexedDataset returns views into an mmap it closes
    when it is garbage-collected)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [np.array(ds[i]) for i in range(len(ds))]


def test_writer_matches_megatron_core_builder(tmp_path):
    import megatron.core.datasets.indexed_dataset as mi
    import torch

    assert mi._INDEX_HEADER == INDEX_HEADER
    assert all(mi.DType.code_from_dtype(t) == code for t, code in DTYPE_CODES.items())
    docs = [np.arange(n, dtype=np.int64) * 7 % 65000 for n in (5, 1, 300, 3)]
    ours = StreamingIndexedWriter(str(tmp_path / "ours"), np.uint16)
    ours.add_documents(np.concatenate(docs[:3]), [5, 1, 300])
    ours.add_documents(docs[3], [3])
    ours.finish()
    ours.commit()
    builder = mi.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()


def test_text_documents_with_languages(tmp_path):
    prefix, summary = preprocess(tmp_path, ['{"text": "Drink clean water.", "lang": "en"}',
                                            '{"text": "Kunywa maji safi.", "lang": "sw"}',
                                            '{"text": "Bois de l\'eau propre.", "lang": "fr"}'])
    ds = documents(prefix)
    assert len(ds) == 3 and summary["documents"] == 3
    assert all(int(ds[i][-1]) == summary["end_of_text_id"] for i in range(3))  # each document ends with EOD
    langs = np.asarray(summary["languages"])[np.load(prefix + ".lang.npy")]
    assert langs.tolist() == ["en", "sw", "fr"]
    assert summary["per_family"]["Indo-European"]["documents"] == 2
    assert summary["per_family"]["Kongolese"]["tokens"] == len(ds[1])
    assert os.path.getsize(prefix + ".png") > 1000


def test_chat_loss_mask_covers_answers_and_end_of_text(tmp_path):
    from tokenizers import Tokenizer

    record = {"messages": [{"role": "user", "content": "What is fever?"},
                           {"role": "assistant", "content": "A high temperature."},
                           {"role": "user", "content": "And ORS?"},
                           {"role": "assistant", "content": "Oral rehydration solution."}], "lang": "en"}
    prefix, summary = preprocess(tmp_path, [json.dumps(record)], fmt="chat")
    tokens, mask = documents(prefix)[0], documents(prefix + ".loss_mask")[0]
    tok = Tokenizer.from_file(os.path.join(TOKENIZER, "tokenizer.json"))
    text = tok.decode(tokens.tolist(), skip_special_tokens=False)
    assert text == ("User:What is fever?\nAssistant:A high temperature.<|endoftext|>\nUser:And ORS?\n"
                    "Assistant:Oral rehydration solution.<|endoftext|>")
    trained = tok.decode([t for t, m in zip(tokens.tolist(), mask.tolist()) if m], skip_special_tokens=False)
    assert trained == "A high temperature.<|endoftext|>Oral rehydration solution.<|endoftext|>"


def test_apollo_records_take_language_from_source(tmp_path):
    lines = [json.dumps({"conversations": [{"value": "Swali?"}, {"value": "Jibu."}], "source": "medicalExam_sw"}),
             json.dumps({"conversations": [{"value": "Q?"}, {"value": "A."}]})]
    prefix, summary = preprocess(tmp_path, lines, fmt="chat", name="general_en.jsonl")
    assert np.asarray(summary["languages"])[np.load(prefix + ".lang.npy")].tolist() == ["sw", "en"]
    assert np.asarray(summary["sources"])[np.load(prefix + ".source.npy")].tolist() == ["medicalExam_sw", "general_en"]


BAD = [  # (line, format, reason)
    (b'{"text": "unterminated\n', "text", "malformed_json"),
    (b'{"lang": "en"}\n', "text", "missing_text"),
    (b'{"text": "  ", "lang": "en"}\n', "text", "empty_text"),
    (b'{"text": "x", "lang": "xx"}\n', "text", "unknown_language"),
    (b'{"text": "caf\xe9", "lang": "fr"}\n', "text", "invalid_utf8"),
    (b'{"conversations": [{"value": "Question only?"}], "source": "medicalExam_en"}\n', "chat", "no_answer"),
    (b'[1, 2]\n', "text", "not_an_object"),
    (b'{"text": "no language here"}\n', "text", "missing_language"),
]
GOOD = {"text": b'{"text": "Wash your hands.", "lang": "en"}\n',
        "chat": b'{"conversations": [{"value": "Q?"}, {"value": "A."}], "source": "medicalWiki_en_qa"}\n'}


@pytest.mark.parametrize("line, fmt, reason", BAD, ids=[b[2] for b in BAD])
def test_bad_record_fails_with_file_and_line(tmp_path, line, fmt, reason):
    with pytest.raises(PreprocessError) as err:
        preprocess(tmp_path, [GOOD[fmt], line], fmt=fmt, name="data.jsonl")
    assert f"{tmp_path / 'data.jsonl'}:2: " in str(err.value)
    assert not list(tmp_path.glob("out*"))  # nothing written under the prefix, not even aside


@pytest.mark.parametrize("line, fmt, reason", BAD, ids=[b[2] for b in BAD])
def test_bad_record_is_skipped_and_counted(tmp_path, line, fmt, reason):
    prefix, summary = preprocess(tmp_path, [GOOD[fmt], line, GOOD[fmt]], fmt=fmt, on_error="skip")
    assert summary["documents"] == 2 and summary["skipped"] == {reason: 1}
    assert ":2: " in summary["skipped_examples"][reason]


def test_chunks_split_at_line_ends(tmp_path):
    from megatron_medmoe.data.preprocess import _chunks

    path = tmp_path / "c.jsonl"
    lines = [b"a" * n + b"\n" for n in (3, 10, 1, 40, 2)] + [b"tail-without-newline"]
    path.write_bytes(b"".join(lines))
    chunks = list(_chunks([str(path)], chunk_bytes=8))
    data = path.read_bytes()
    assert b"".join(data[s:e] for _, s, e, _ in chunks) == data
    assert all(data[s:e].endswith(b"\n") for _, s, e, _ in chunks[:-1])
    assert [first for *_, first in chunks] == [1 + data[:s].count(b"\n") for _, s, _, _ in chunks]


def test_line_numbers_count_blank_lines(tmp_path):
    with pytest.raises(PreprocessError, match=r"data.jsonl:5: unknown language code 'xx'"):
        preprocess(tmp_path, [GOOD["text"], b"\n", GOOD["text"], b"   \n", b'{"text": "x", "lang": "xx"}\n'],
                   name="data.jsonl")


def test_empty_input_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "good.jsonl").write_bytes(GOOD["text"])
    options = dict(inputs=[str(tmp_path / "*.jsonl")], tokenizer=TOKENIZER, output_prefix=str(tmp_path / "out"))
    with pytest.raises(PreprocessError, match="empty.jsonl: the input file is empty"):
        run_preprocess(PreprocessOptions(**options), progress=False)
    summary = run_preprocess(PreprocessOptions(**options, on_error="skip"), progress=False)
    assert summary["documents"] == 1 and summary["skipped"] == {"empty_file": 1}


def test_nothing_usable_is_an_error(tmp_path):
    with pytest.raises(PreprocessError, match="no documents were produced"):
        preprocess(tmp_path, [BAD[0][0]], on_error="skip")


def test_long_documents_are_kept_whole(tmp_path):
    text = " ".join(["malaria fever water"] * 400)  # far longer than any training row
    prefix, summary = preprocess(tmp_path, [json.dumps({"text": text, "lang": "en"})])
    assert len(documents(prefix)[0]) == summary["tokens"] > 1000


def test_two_workers_write_the_same_bytes(tmp_path):
    outputs = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        run_preprocess(PreprocessOptions(inputs=[str(REPO / "examples/data/chat/*.jsonl")], tokenizer=TOKENIZER,
                                         output_prefix=prefix, fmt="chat", workers=workers, chunk_bytes=1000),
                       progress=False)
        outputs.append([open(prefix + ext, "rb").read() for ext in
                        (".bin", ".idx", ".loss_mask.bin", ".lang.npy", ".source.npy")])
    assert outputs[0] == outputs[1]


def test_killed_run_leaves_no_dataset_under_the_prefix(tmp_path):
    corpus = tmp_path / "big.jsonl"
    with open(corpus, "w") as f:
        for i in range(40000):
            f.write(json.dumps({"text": f"Document {i}: wash hands with soap and clean water.", "lang": "en"}) + "\n")
    prefix = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_medmoe", "preprocess", "--input", str(corpus),
                             "--tokenizer", TOKENIZER, "--output-prefix", str(prefix), "--quiet"],
                            cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out.partial.bin").exists() or (tmp_path / "out.partial.bin").stat().st_size == 0:
        assert proc.poll() is None and time.monotonic() < deadline, "preprocess ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out") and ".partial" not in p.name]


def test_cli_reports_and_exit_codes(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_bytes(GOOD["text"] + BAD[3][0])
    out = run_medmoe(["preprocess", "--input", str(good), "--tokenizer", TOKENIZER, "--output-prefix",
                      str(tmp_path / "a"), "--on-error", "skip"])
    assert "English" in out.stdout and "skipped records: unknown_language 1" in out.stdout
    failed = run_medmoe(["preprocess", "--input", str(good), "--tokenizer", TOKENIZER, "--output-prefix",
                         str(tmp_path / "b")], check=False)
    assert failed.returncode == 3 and f"{good}:2: unknown language code 'xx'" in failed.stderr
    usage = run_medmoe(["preprocess", "--input", str(tmp_path / "none*.jsonl"), "--tokenizer", TOKENIZER,
                        "--output-prefix", str(tmp_path / "c")], check=False)
    assert usage.returncode == 2 and "matches no file" in usage.stderr


def test_tokenizer_chat_template(tmp_path):
    """--chat-template tokenizer: the template of the tokenizer directory; loss on what each assistant turn adds."""
    import shutil

    from tokenizers import Tokenizer

    tok_dir = tmp_path / "tok"
    shutil.copytree(TOKENIZER, tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    record = {"messages": [{"role": "user", "content": "Fever?"}, {"role": "assistant", "content": "Rest."}],
              "lang": "en"}
    (tmp_path / "c.jsonl").write_text(json.dumps(record) + "\n")
    prefix = str(tmp_path / "out")
    run_preprocess(PreprocessOptions(inputs=[str(tmp_path / "c.jsonl")], tokenizer=str(tok_dir), output_prefix=prefix,
                                     fmt="chat", template="tokenizer"), progress=False)
    tokens, mask = documents(prefix)[0], documents(prefix + ".loss_mask")[0]
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert tok.decode(tokens.tolist(), skip_special_tokens=False) == \
        "<|endoftext|>user\nFever?\n<|endoftext|>assistant\nRest.\n"
    assert tok.decode([t for t, m in zip(tokens.tolist(), mask.tolist()) if m], skip_special_tokens=False) == "Rest.\n"
