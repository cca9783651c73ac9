"""Bad input gets a clear error naming what and where: corpus records, tokenizers, checkpoints."""
import pytest

from conftest import TINY, run_medmoe
from megatron_medmoe.data.packing import pack_documents
from megatron_medmoe.data.text_corpus import CorpusError, read_text_documents
from megatron_medmoe.data.tokenizer import TokenizerError, load_tokenizer
from megatron_medmoe.languages import load_registry

REGISTRY = load_registry("families")


@pytest.mark.parametrize("line, message", [
    ('{"text": "unterminated', "malformed JSON"),
    ('["text", "en"]', "expected a JSON object"),
    ('{"lang": "en"}', 'missing or empty "text"'),
    ('{"text": "   ", "lang": "en"}', 'missing or empty "text"'),
    ('{"text": "hi"}', "missing language field 'lang'"),
    ('{"text": "hi", "lang": "xx"}', "unknown language code 'xx'"),
])
def test_corpus_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine", "lang": "sw"}\n' + line + "\n")
    with pytest.raises(CorpusError) as err:
        list(read_text_documents([str(path)], REGISTRY))
    assert f"{path}:2: " in str(err.value) and message in str(err.value)


def test_documents_carry_their_family_id(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a", "lang": "sw"}\n\n{"text": "b", "lang": "zh"}\n')
    docs = list(read_text_documents([str(path)], REGISTRY))
    assert [(d.lang, d.family_id, d.source) for d in docs] == [("sw", 6, f"{path}:1"), ("zh", 0, f"{path}:3")]


def test_packing_keeps_every_token_and_its_family():
    docs = [([1] * 5, 3), ([2] * 9, 5), ([4] * 2, 1)]  # 5 + 9 + 2 tokens, each document ends with EOD (0)
    rows = pack_documents(docs, seq_length=4, end_of_text=0)
    stream = rows.tokens[:, :-1].reshape(-1)
    assert stream[:19].tolist() == [1] * 5 + [0] + [2] * 9 + [0] + [4] * 2 + [0]  # nothing dropped
    assert rows.family_ids[:, :-1].reshape(-1)[:19].tolist() == [3] * 6 + [5] * 10 + [1] * 3
    assert (rows.tokens[1:, 0] == rows.tokens[:-1, -1]).all()  # labels continue into the next row
    assert rows.family_ids[-1, -1] == 1 and rows.loss_mask.reshape(-1)[18:].tolist() == [0.0] * 2  # padding


def test_missing_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "none"))
    with pytest.raises(TokenizerError, match="cannot load a Hugging Face tokenizer"):
        load_tokenizer(str(tmp_path))


def test_training_stops_cleanly_on_bad_input(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": "ok", "lang": "en"}\n{"text": "bad", "lang": "klingon"}\n')
    proc = run_medmoe(["train", TINY, f"data.paths=[{corpus}]", "checkpoint.save=null",
                       f"logging.output_dir={tmp_path / 'out'}"], check=False, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"{corpus}:2: unknown language code 'klingon'" in proc.stderr and "Traceback" not in proc.stderr
