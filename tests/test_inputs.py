"""Bad input at training time gets a clear error naming what and where, without a traceback."""
import shutil

import pytest

from conftest import REPO, run_medmoe, train_stage
from megatron_medmoe.data.tokenizer import TokenizerError, load_tokenizer


def test_missing_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "none"))
    with pytest.raises(TokenizerError, match="cannot load a Hugging Face tokenizer"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("damage, message", [
    ("remove_bin", "is incomplete: missing"),
    ("truncate_bin", "tiny_text.bin has {actual:,} bytes but {prefix}.idx describes {expected:,} (cut short"),
    ("wrong_table", "unknown language code 'ceb'"),
], ids=["remove_bin", "truncate_bin", "wrong_table"])
def test_training_stops_cleanly_on_a_bad_dataset(tmp_path, damage, message):
    prefix = tmp_path / "tiny_text"
    for src in (REPO / "runs" / "data").glob("tiny_text*"):
        shutil.copy(src, tmp_path / src.name)
    overrides = [f"data.datasets=[{{prefix: {prefix}}}]", "checkpoint.save=null", f"logging.output_dir={tmp_path / 'out'}"]
    if damage == "remove_bin":
        (tmp_path / "tiny_text.bin").unlink()
    elif damage == "truncate_bin":  # a copy cut short
        expected = (tmp_path / "tiny_text.bin").stat().st_size
        with open(tmp_path / "tiny_text.bin", "r+b") as f:
            f.truncate(expected // 2)
        message = message.format(actual=expected // 2, expected=expected, prefix=prefix)
    else:
        overrides += ["data.language_table=languages12", "moe.expert_slots=12"]
    proc = run_medmoe(train_stage("cpt", *overrides), check=False, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert message in proc.stderr and str(prefix) in proc.stderr and "Traceback" not in proc.stderr
