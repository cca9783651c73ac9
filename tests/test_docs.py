"""What the README and docs show works: the two opening commands, every shell block, the generated
configuration reference, the shipped tokenizer."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cpu_env, read_metrics
from megatron_medmoe.config.reference import render_reference

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shell_blocks(path):
    return re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def run_block(block, timeout=900):
    env = cpu_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{block}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def test_readme_opens_with_the_two_commands():
    first = shell_blocks(REPO / "README.md")[0]
    commands = [line.split("#")[0].strip() for line in first.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (REPO / ".ci" / "run").read_text()  # CI runs the test command


def test_make_demo_preprocesses_then_trains_both_stages():
    import shutil

    shutil.rmtree(REPO / "runs" / "tiny", ignore_errors=True)  # else the finished stages are skipped
    proc = run_block("make demo")
    cpt, sft = read_metrics(REPO / "runs" / "tiny", "cpt"), read_metrics(REPO / "runs" / "tiny", "sft")
    assert cpt[-1]["step"] == 300 and cpt[-1]["loss"] < cpt[0]["loss"] - 3.0
    assert len(cpt[-1]["family_loss"]) == 7
    for family, loss in cpt[-1]["family_loss"].items():
        assert loss < cpt[0]["family_loss"].get(family, 7.0) - 2.0, family
    assert "initialized the model weights from runs/tiny/checkpoints/cpt (saved at step 300)" in proc.stdout
    assert sft[-1]["step"] == 120 and sft[-1]["loss"] < sft[0]["loss"] - 1.0
    assert sft[0]["loss"] < cpt[0]["loss"] - 2.0  # stage 2 starts from stage 1's weights, not from scratch
    assert "English" in proc.stdout and "loss by family: Sino-Tibetan" in proc.stdout and "expert share" in proc.stdout


@pytest.mark.multiprocess
def test_every_other_shell_block_runs():
    import shutil

    for done in ("resume", "hf", "convert"):  # outputs the blocks create anew
        shutil.rmtree(REPO / "runs" / done, ignore_errors=True)
    blocks = [b for path in DOCS for b in shell_blocks(path)]
    assert len(blocks) >= 2
    for block in blocks[1:]:
        run_block(block)
    for out, stage in (("tp2", "cpt"), ("pp2ep2", "cpt"), ("temperature", "sft"), ("torchrun", "cpt")):
        assert read_metrics(REPO / "runs" / out, stage)[-1]["step"] == 10
    resumed = read_metrics(REPO / "runs" / "resume", "cpt")
    assert [r["step"] for r in resumed] == list(range(10, 61, 10))  # one run stopped by the clock, one resumed
    assert (REPO / "runs" / "hf" / "tiny-moe" / "tokenizer.json").exists()  # exported with the datasets' tokenizer
    assert read_metrics(REPO / "runs" / "convert" / "train", "cpt")[-1]["step"] == 10
    assert (REPO / "runs" / "data" / "kongolese.json").exists() and (REPO / "runs" / "data" / "chat_copy.png").exists()


def test_configuration_reference_is_current():
    assert (REPO / "docs" / "configuration.md").read_text(encoding="utf-8") == render_reference(), \
        "run python tools/render_config_reference.py"


def test_shipped_tokenizer_is_what_the_tool_builds(tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "build_tiny_tokenizer.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    shipped = REPO / "examples" / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_text() == (shipped / name).read_text(), name
