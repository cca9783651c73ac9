"""`medmoe preprocess`: megatron-core-readable output, languages per document, chat loss masks, every kind
of bad input with --on-error fail and skip, nothing half-written, stopped or killed."""
import codecs
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from conftest import REPO, TOKENIZER, cpu_env, run_medmoe
from megatron_medmoe.data import indexed
from megatron_medmoe.data.indexed import DTYPE_CODES, INDEX_HEADER, StreamingIndexedWriter
from megatron_medmoe.data.preprocess import PreprocessError, PreprocessOptions, preprocess_command, run_preprocess


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
    assert indexed.expected_bin_size(str(tmp_path / "theirs.idx")) == (tmp_path / "theirs.bin").stat().st_size


def unnamed_files_work_in(directory) -> bool:
    """Whether this file system can hold unnamed (O_TMPFILE) files; where not, scratch files are named."""
    try:
        os.close(os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600))
        return indexed._ANONYMOUS
    except OSError:
        return False


def write_two_documents(prefix):
    writer = StreamingIndexedWriter(prefix, np.uint16)
    writer.add_documents(np.arange(7), [4, 3])
    writer.finish()
    return writer


def test_scratch_files_have_no_name_until_committed(tmp_path):
    if not unnamed_files_work_in(tmp_path):
        pytest.skip("no unnamed files on this file system")
    writer = write_two_documents(str(tmp_path / "d"))
    assert list(tmp_path.iterdir()) == []  # written, but nothing to see (or to leave behind if killed)
    writer.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    assert (tmp_path / "d.bin").read_bytes() == np.arange(7, dtype=np.uint16).tobytes()


def test_named_scratch_files_where_unnamed_ones_are_unsupported(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "_ANONYMOUS", False)
    write_two_documents(str(tmp_path / "gone")).discard()
    assert list(tmp_path.iterdir()) == []
    writer = write_two_documents(str(tmp_path / "d"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin.partial", "d.idx.partial"]
    writer.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]
    monkeypatch.setattr(indexed, "_ANONYMOUS", True)
    anonymous = write_two_documents(str(tmp_path / "a"))
    anonymous.commit()
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"d{ext}").read_bytes()


def test_a_second_run_replaces_the_dataset(tmp_path):
    prefix, _ = preprocess(tmp_path, ['{"text": "First corpus, longer than the second one.", "lang": "en"}'])
    _, summary = preprocess(tmp_path, ['{"text": "Second.", "lang": "sw"}'], name="other.jsonl")
    assert [len(d) for d in documents(prefix)] == [summary["tokens"]] and summary["languages"] == ["sw"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == \
        ["out.bin", "out.class.npy", "out.idx", "out.json", "out.lang.npy", "out.png", "out.source.npy"]


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
    (b'{"text": "half a pair \\ud800 here", "lang": "en"}\n', "text", "invalid_unicode"),
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


def test_lone_surrogates_anywhere_are_refused_and_pairs_are_kept(tmp_path):
    lines = [b'{"conversations": [{"value": "Q?"}, {"value": "A \\udc00"}], "source": "medicalExam_en"}\n',
             b'{"conversations": [{"value": "Q?"}, {"value": "A."}], "source": "medicalExam_en\\ud800"}\n',
             b'{"conversations": [{"value": "Emoji?"}, {"value": "\\ud83d\\ude00"}], "source": "medicalExam_en"}\n']
    prefix, summary = preprocess(tmp_path, lines, fmt="chat", on_error="skip")
    assert summary["documents"] == 1 and summary["skipped"] == {"invalid_unicode": 2}
    assert "the conversation has a lone surrogate \\udc00" in summary["skipped_examples"]["invalid_unicode"]


def test_byte_order_mark_at_the_start_of_a_file_is_accepted(tmp_path):
    bom = codecs.BOM_UTF8
    (tmp_path / "a.jsonl").write_bytes(bom + GOOD["text"] + GOOD["text"])
    (tmp_path / "b.jsonl").write_bytes(bom)  # a mark and nothing else: an empty file
    summary = run_preprocess(PreprocessOptions(inputs=[str(tmp_path / "*.jsonl")], tokenizer=TOKENIZER,
                                               output_prefix=str(tmp_path / "out"), on_error="skip"), progress=False)
    assert summary["documents"] == 2 and summary["skipped"] == {"empty_file": 1}


def test_a_directory_as_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_bytes(GOOD["text"])
    for pattern in (tmp_path / "corpus", tmp_path / "c*"):
        options = PreprocessOptions(inputs=[str(pattern)], tokenizer=TOKENIZER, output_prefix=str(tmp_path / "out"))
        assert preprocess_command(options, quiet=True) == 3
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{tmp_path / 'corpus'} is a directory" in err
        assert f"--input '{tmp_path / 'corpus' / '*.jsonl'}'" in err


def test_language_codes_are_normalised_and_reported(tmp_path, capsys):
    lines = ['{"text": "Wash.", "lang": "EN"}', '{"text": "Lave.", "lang": "fr"}', '{"text": "Lave.", "lang": "pt_BR"}',
             '{"text": "Xi.", "lang": "zh-CN"}', '{"text": "Xi.", "lang": "zh-CN"}']
    prefix, summary = preprocess(tmp_path, lines)
    assert np.asarray(summary["languages"])[np.load(prefix + ".lang.npy")].tolist() == ["en", "fr", "pt", "zh", "zh"]
    assert summary["normalised_languages"] == {"EN": {"code": "en", "documents": 1},
                                               "pt_BR": {"code": "pt", "documents": 1},
                                               "zh-CN": {"code": "zh", "documents": 2}}
    assert summary["per_language"]["zh"]["documents"] == 2
    (tmp_path / "in.jsonl").write_text('{"text": "Wash."}\n')
    options = PreprocessOptions(inputs=[str(tmp_path / "in.jsonl")], tokenizer=TOKENIZER,
                                output_prefix=str(tmp_path / "cli"), lang="SW")
    assert preprocess_command(options) == 0
    assert "language codes normalised to the table's: SW -> sw (1 document)" in capsys.readouterr().out


def test_ambiguous_language_code_is_a_bad_record(tmp_path):
    table = tmp_path / "two.yaml"
    table.write_text("experts: [a]\nlanguages:\n  - {code: pt, name: P, family: F, expert: a, tier: major}\n"
                     "  - {code: PT, name: P2, family: F, expert: a, tier: minor}\n")
    lines = [GOOD["text"].replace(b'"en"', b'"pt"'), GOOD["text"].replace(b'"en"', b'"pt_BR"')]
    with pytest.raises(PreprocessError, match=r"in.jsonl:2: language code 'pt_BR' is ambiguous"):
        preprocess(tmp_path, lines, language_table=str(table))
    _, summary = preprocess(tmp_path, lines, language_table=str(table), on_error="skip")
    assert summary["documents"] == 1 and summary["skipped"] == {"ambiguous_language": 1}


def test_chunks_split_at_line_ends(tmp_path):
    from megatron_medmoe.data.inputs import line_chunks

    path = tmp_path / "c.jsonl"
    lines = [b"a" * n + b"\n" for n in (3, 10, 1, 40, 2)] + [b"tail-without-newline"]
    path.write_bytes(b"".join(lines))
    chunks = list(line_chunks(str(path), chunk_bytes=8))
    data = path.read_bytes()
    assert b"".join(data[c.start:c.end] for c in chunks) == data
    assert all(data[c.start:c.end].endswith(b"\n") for c in chunks[:-1])
    assert [c.first_line for c in chunks] == [1 + data[:c.start].count(b"\n") for c in chunks]


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
                        (".bin", ".idx", ".loss_mask.bin", ".lang.npy", ".source.npy", ".class.npy")])
    assert outputs[0] == outputs[1]


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory):
    """Large enough that a run is still writing when it is stopped (about 10 s of work on 2 cores)."""
    corpus = tmp_path_factory.mktemp("big") / "big.jsonl"
    with open(corpus, "w") as f:
        for i in range(60000):
            text = f"Document {i}: wash hands with soap and clean water. " * 3
            f.write(json.dumps({"text": text, "lang": "en"}) + "\n")
    return corpus


def start_mid_run(corpus, prefix, workers):
    """`medmoe preprocess`, returned once it has written tokens (to its scratch files) and started its workers."""
    proc = subprocess.Popen([sys.executable, "-m", "megatron_medmoe", "preprocess", "--input", str(corpus),
                             "--tokenizer", TOKENIZER, "--output-prefix", str(prefix), "--workers", str(workers),
                             "--chunk-bytes", "100000", "--quiet"],
                            cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "preprocess ended before it could be stopped"
        fds = f"/proc/{proc.pid}/fd"
        try:
            writing = any(os.readlink(f"{fds}/{fd}").startswith(str(prefix.parent)) and os.stat(f"{fds}/{fd}").st_size
                          for fd in os.listdir(fds))
        except OSError:  # a descriptor closed while we looked
            writing = False
        workers_up = len(psutil.Process(proc.pid).children()) == (workers if workers > 1 else 0)
        if writing and workers_up:
            return proc, psutil.Process(proc.pid).children()
        time.sleep(0.05)


def assert_nothing_survives(tmp_path, workers, killed=False):
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"workers outlived the command: {alive}"
    left = [p.name for p in tmp_path.iterdir()]
    if killed and not unnamed_files_work_in(tmp_path):  # named scratch files outlive a SIGKILL
        left = [name for name in left if not name.endswith(".partial")]
    assert left == []  # no dataset and no scratch file, however it stopped


@pytest.mark.parametrize("workers, sig", [(2, signal.SIGKILL), (2, signal.SIGTERM), (1, signal.SIGTERM),
                                          (2, signal.SIGINT), (1, signal.SIGHUP)],
                         ids=["2-SIGKILL", "2-SIGTERM", "1-SIGTERM", "2-SIGINT", "1-SIGHUP"])
def test_a_stopped_or_killed_run_leaves_nothing(tmp_path, big_corpus, workers, sig):
    proc, children = start_mid_run(big_corpus, tmp_path / "out", workers)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert_nothing_survives(tmp_path, children, killed=sig == signal.SIGKILL)
    if sig == signal.SIGKILL:
        assert proc.returncode == -sig
    else:  # one line, the shell's code for a command ended by this signal
        assert proc.returncode == 128 + sig
        assert err == f"medmoe preprocess: stopped by {sig.name}; nothing was written under {tmp_path / 'out'}\n"


def test_a_worker_that_dies_stops_the_run_cleanly(tmp_path, big_corpus):
    proc, children = start_mid_run(big_corpus, tmp_path / "out", 2)
    children[0].kill()  # as the out-of-memory killer would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err == (f"medmoe preprocess: a worker process died (killed by SIGKILL); nothing was written under "
                   f"{tmp_path / 'out'}\n")
    assert_nothing_survives(tmp_path, children)


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
