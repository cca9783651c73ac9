"""benchmarks/gpu_throughput.py runs end to end on this machine: on CPU with the tiny shape (our trainer in fp32
against the baseline on the same micro-batches, FP8 reported as skipped). The GPU numbers come from the same
script on a GPU machine (docs/benchmarks.md)."""
import json
import subprocess
import sys

from conftest import REPO, cpu_env


def test_throughput_script_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--shapes", "tiny",
                           "--steps", "4", "--log-interval", "2", "--seq-length", "128", "--global-batch", "8",
                           "--micro-batch", "4", "--out", str(tmp_path)], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    ours, base = results["rows"]
    assert ours["stack"] == "ours" and ours["tokens_per_s"] > 0 and [s for s, _ in ours["losses"]] == [2, 4]
    assert base["stack"].startswith("baseline") and base["tokens_per_s"] > 0 and base["tflops"] > 0
    assert 0 < ours["planned_memory_gib"] < 0.1  # the planner's estimate for the same layout
    assert "needs TransformerEngine layers, which cannot be used here (no GPU is present)" in results["fp8_skipped"]
    assert "FP8 skipped: fp8.format=hybrid needs TransformerEngine layers" in proc.stdout
    assert ours["layers"] == "local"  # no TransformerEngine on this machine: recorded, not assumed
    assert "| tiny | ours | local | fp32 |" in proc.stdout
    assert "| tiny | baseline (HF-style, expert loop) | hf-style | fp32 |" in proc.stdout
