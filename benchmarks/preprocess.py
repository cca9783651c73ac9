"""Preprocessing throughput and memory with a real Qwen2 tokenizer, against a baseline and the limit.

    python benchmarks/preprocess.py [--size-mb 200] [--rounds 3] [--cache benchmarks/.cache]

On a generated multilingual corpus (the bundled medical text recombined, every family, >= 200 MB):
- limit: the tokenizer's own batched encode (`encode_batch_fast`, all cores) over the texts already in
  memory, nothing written;
- baseline: Megatron-LM preprocess_data.py's approach: a multiprocessing pool calling the tokenizer once
  per document (imap, chunksize 32), the main process writing one document at a time with megatron-core's
  IndexedDatasetBuilder;
- medmoe preprocess, end to end (read, parse, tokenize, write .bin/.idx/.lang/.source/.json/.png),
  with 1 and 2 workers, and its peak memory (the whole process tree) on half and on the full corpus.
The machine's speed drifts between runs (shared hosts), so the limit and medmoe preprocess are measured in
alternation for several rounds and each round's ratio is taken against that round's limit; the table
shows medians. Then the training loader: micro-batches/s of the default and the DALI loader against what
the tiny model consumes. The Qwen2 vocabulary comes from llama-cpp-python's source distribution (PyPI, ~77 MB, once).
Prints markdown tables for docs/benchmarks.md.
"""
import argparse
import glob
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
GGUF = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"


def qwen2_tokenizer(cache: str) -> str:
    out = os.path.join(cache, "qwen2-tokenizer")
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    os.makedirs(cache, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "llama-cpp-python==0.3.36", "-d", cache], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "gguf"], check=True)
    with tarfile.open(os.path.join(cache, "llama_cpp_python-0.3.36.tar.gz")) as tar:
        tar.extract(GGUF, cache, filter="data")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(cache, os.path.dirname(GGUF)), gguf_file=os.path.basename(GGUF))
    tokenizer.save_pretrained(out)
    return out


def corpus(cache: str, size_mb: int) -> str:
    path = os.path.join(cache, f"corpus_{size_mb}mb.jsonl")
    if os.path.isfile(path):
        return path
    sentences = {}
    for f in sorted(glob.glob(os.path.join(ROOT, "examples", "data", "text", "*.jsonl"))):
        for line in open(f, encoding="utf-8"):
            record = json.loads(line)
            sentences.setdefault(record["lang"], []).extend(
                s.strip() for s in record["text"].replace("。", ". ").replace("।", ". ").split(". ") if s.strip())
    rng = random.Random(0)
    langs = sorted(sentences)
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as out:
        while out.tell() < size_mb * 1_000_000:
            lang = rng.choice(langs)
            text = ". ".join(rng.choice(sentences[lang]) for _ in range(rng.randint(2, 40))) + "."
            out.write(json.dumps({"text": text, "lang": lang}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def limit(tokenizer_dir: str, path: str):
    from tokenizers import Tokenizer

    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), 4096):
        tokens += sum(len(e) for e in tok.encode_batch_fast(texts[i:i + 4096], add_special_tokens=False))
    return tokens / (time.perf_counter() - start), tokens


_BASELINE = {}


def _baseline_init(tokenizer_dir):
    from transformers import AutoTokenizer

    _BASELINE["tok"] = AutoTokenizer.from_pretrained(tokenizer_dir)


def _baseline_encode(line):
    ids = _BASELINE["tok"](json.loads(line)["text"], add_special_tokens=False)["input_ids"]
    ids.append(_BASELINE["tok"].eos_token_id)
    return ids


def baseline(tokenizer_dir: str, path: str, workers: int):
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    with tempfile.TemporaryDirectory() as out, open(path, encoding="utf-8") as lines:
        start, tokens = time.perf_counter(), 0
        builder = IndexedDatasetBuilder(os.path.join(out, "b.bin"), dtype=np.int32)
        with multiprocessing.get_context("fork").Pool(workers, _baseline_init, (tokenizer_dir,)) as pool:
            for ids in pool.imap(_baseline_encode, lines, 32):
                builder.add_item(torch.tensor(ids, dtype=torch.int32))
                builder.end_document()
                tokens += len(ids)
        builder.finalize(os.path.join(out, "b.idx"))
        return tokens / (time.perf_counter() - start)


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


def ours(tokenizer_dir: str, path: str, workers: int):
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "megatron_medmoe", "preprocess", "--input", path, "--tokenizer",
                                 tokenizer_dir, "--output-prefix", os.path.join(out, "o"), "--workers", str(workers),
                                 "--quiet"], cwd=ROOT)
        peak = [0]

        def watch():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        assert proc.wait() == 0
        watcher.join()
        seconds = time.perf_counter() - start
        with open(os.path.join(out, "o.json")) as f:
            tokens = json.load(f)["tokens"]
        return tokens / seconds, peak[0] / 2**20, seconds


def loader_throughput(loader: str, seconds: float = 8.0):
    os.chdir(ROOT)
    from megatron_medmoe.config import load_stages, resolve_config
    from megatron_medmoe.data.loader import TrainingData, batch_source
    from megatron_medmoe.languages import load_registry

    stages = load_stages(os.path.join(ROOT, "examples", "tiny.yaml"),
                         [f"data.loader={loader}", "training.train_steps=2000", "parallel.data=2", "checkpoint.load=null"])
    cfg = resolve_config(next(s.config for s in stages if s.name == "sft"))
    source = batch_source(TrainingData(cfg, load_registry()), 0, 2)
    source.micro_batches(0, 0, 2)
    start, step, batches = time.perf_counter(), 1, 0
    while time.perf_counter() - start < seconds and step < cfg.training.train_steps:
        batches += len(source.micro_batches(step * cfg.training.global_batch_size, 0, 2))
        step += 1
    return batches / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", default=os.path.join(ROOT, "benchmarks", ".cache"))
    args = parser.parse_args()
    tok = qwen2_tokenizer(args.cache)
    full, half = corpus(args.cache, args.size_mb), corpus(args.cache, args.size_mb // 2)
    print(f"Corpus: {os.path.getsize(full) / 1e6:.0f} MB ({sum(1 for _ in open(full)):,} documents), Qwen2 tokenizer "
          f"(151,936 tokens), {os.cpu_count()} cores\n", flush=True)
    rounds = {"limit": [], 1: [], 2: []}
    peaks = {1: 0.0, 2: 0.0}
    for _ in range(args.rounds):
        top, tokens = limit(tok, full)
        rounds["limit"].append(top)
        for workers in (1, 2):
            rate, peak, _ = ours(tok, full, workers)
            rounds[workers].append(rate / top)
            peaks[workers] = max(peaks[workers], peak)
    top = statistics.median(rounds["limit"])
    print(f"| method | workers | tokens/s (median) | share of the limit (median, range) | peak memory |\n"
          f"|---|---|---|---|---|\n| limit: batched encode in memory, nothing written | all cores | {top:,.0f} | "
          f"100% ({min(rounds['limit']):,.0f}-{max(rounds['limit']):,.0f} tokens/s) | |", flush=True)
    for workers in (1, 2):
        rate = baseline(tok, full, workers)
        print(f"| baseline: per-document pool (Megatron-LM) | {workers} | {rate:,.0f} | {rate / top:.0%} | |", flush=True)
    for workers in (1, 2):
        share = statistics.median(rounds[workers])
        print(f"| medmoe preprocess, end to end | {workers} | {share * top:,.0f} | {share:.0%} "
              f"({min(rounds[workers]):.0%}-{max(rounds[workers]):.0%}) | {peaks[workers]:,.0f} MiB |", flush=True)
    _, peak_half, _ = ours(tok, half, 1)
    print(f"\nPeak memory of medmoe preprocess (1 worker): {peak_half:,.0f} MiB on {args.size_mb // 2} MB, "
          f"{peaks[1]:,.0f} MiB on {args.size_mb} MB ({tokens:,} tokens).", flush=True)
    print("\n| loader | micro-batches/s (4 x 128 tokens) |\n|---|---|")
    rates = {loader: loader_throughput(loader) for loader in ("default", "dali")}
    for loader, rate in rates.items():
        print(f"| {loader} | {rate:,.0f} |")
    print("The tiny model (EP 2) consumes 2 micro-batches per rank per step at about 0.14-0.2 s a step: "
          "10-15 micro-batches/s per rank.")


if __name__ == "__main__":
    main()
