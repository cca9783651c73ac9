"""Hugging Face <-> megatron-core conversion of a 1.5B-shape Qwen2: time and peak memory against a plain copy.

    python benchmarks/convert.py [--dir DIR] [--shard-size 1GB] [--keep]

1. Writes a random dense Qwen2 of the ApolloMoE 1.5B shape (28 layers, hidden 1536, ffn 8960, 12/2 heads,
   vocabulary 151936, tied, bfloat16, about 3.1 GB) as safetensors shards of --shard-size.
2. The baseline: reading the same bytes and writing them to new files (flushed to disk), timed.
3. `medmoe convert hf-to-mcore` and `medmoe convert mcore-to-hf --format qwen2`, each a fresh process: wall
   time and peak resident memory (the process's maxrss, from wait4), against the copy time and the largest
   shard. The exported files are compared byte for byte with the source.
Targets: each direction within 2x the copy time; peak RSS under 1.5x the largest shard.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make_source(directory: str, shard_bytes: int) -> None:
    import json

    import torch

    from megatron_medmoe.config import load_config
    from megatron_medmoe.convert.hf_config import QWEN2, hf_config
    from megatron_medmoe.convert.hf_io import ShardedOut
    from megatron_medmoe.convert.hf_to_mcore import arch_of
    from megatron_medmoe.convert.names import entries, hf_shapes

    cfg = load_config(os.path.join(ROOT, "examples", "apollomoe-1.5b.yaml"), ["moe.moe_last_n=0"])
    arch = arch_of(cfg)
    shapes = hf_shapes(arch, cfg.model.ffn_hidden_size, cfg.model.ffn_hidden_size)
    names = [n for e in entries(arch) for n in e.hf]
    os.makedirs(directory)
    out = ShardedOut(directory, [(n, shapes[n], torch.bfloat16) for n in names], shard_bytes)
    generator = torch.Generator().manual_seed(0)
    for name in names:
        out.write(name, (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16))
    out.close()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(cfg, 0, QWEN2, "bfloat16", None, 151643), f, indent=2)


def timed_process(argv):
    """(seconds, peak RSS in bytes) of a fresh process. The peak is the kernel's high-water mark of the
    process after exec (VmHWM), sampled until it exits (ru_maxrss would include this parent's memory)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max(peak, next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return seconds, peak


def read_write_copy(src, dst, files, chunk=64 << 20):
    """The baseline: read every byte and write it to a new file, flushed to disk as a conversion is."""
    os.makedirs(dst)
    buffer = bytearray(chunk)
    start = time.perf_counter()
    for name in files:
        with open(os.path.join(src, name), "rb", buffering=0) as fin, open(os.path.join(dst, name), "wb") as fout:
            while True:
                n = fin.readinto(buffer)
                if not n:
                    break
                fout.write(memoryview(buffer)[:n])
            fout.flush()
            os.fsync(fout.fileno())
    return time.perf_counter() - start


def digest(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def main():
    from megatron_medmoe.convert.hf_io import parse_size
    from step_time import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--shard-size", default="1GB", help="source and export shard size (default 1GB)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="medmoe-convert-")
    src, copy, ours, back = (os.path.join(work, n) for n in ("hf", "copy", "mcore", "back"))
    try:
        make_source(src, parse_size(args.shard_size))
        files = [n for n in sorted(os.listdir(src)) if n.endswith(".safetensors")]
        largest = max(os.path.getsize(os.path.join(src, n)) for n in files)
        total = sum(os.path.getsize(os.path.join(src, n)) for n in files)
        copy_s = read_write_copy(src, copy, files)
        medmoe = [sys.executable, "-m", "megatron_medmoe", "convert"]
        idle_s, idle_rss = timed_process([sys.executable, "-c", "import megatron_medmoe.convert.hf_to_mcore"])
        to_s, to_rss = timed_process([*medmoe, "hf-to-mcore", "--hf", src, "--out", ours, "--quiet"])
        back_s, back_rss = timed_process([*medmoe, "mcore-to-hf", "--ckpt", ours, "--out", back, "--format", "qwen2",
                                          "--max-shard-size", args.shard_size, "--quiet"])
        exact = digest(src) == digest(back)
        gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
        print(f"Machine: {machine()}\n")
        print(f"Source: {len(files)} shard(s), {gb(total)} in all, largest {gb(largest)}; reading and writing the "
              f"same bytes (fsync'd, as conversions are): {copy_s:.1f} s; starting Python and importing the converter "
              f"alone: {idle_s:.1f} s, {gb(idle_rss)} peak RSS\n")
        print("| direction | time, s | vs copy | peak RSS | vs largest shard |\n|---|---|---|---|---|")
        for name, s, rss in (("hf-to-mcore", to_s, to_rss), ("mcore-to-hf (qwen2)", back_s, back_rss)):
            print(f"| {name} | {s:.1f} | {s / copy_s:.2f}x | {gb(rss)} | {rss / largest:.2f}x |")
        print(f"\nexported shards identical to the source, byte for byte: {exact}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
