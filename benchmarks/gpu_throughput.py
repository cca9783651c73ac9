"""Training throughput on one GPU: our trainer (megatron-core, TransformerEngine layers when they import) in bf16
and FP8 against the released stack's approach (benchmarks/baseline_model.py: Hugging Face-style Qwen2 with a
Python loop over experts, PyTorch SDPA attention), at the same shapes and batches, in one run.

    python benchmarks/gpu_throughput.py [--shapes 0.5b 1.5b] [--precisions bf16 fp8] [--fp8-recipe blockwise]
        [--steps 30] [--log-interval 10] [--micro-batch 1] [--global-batch 8] [--seq-length 4096]
        [--convergence-steps 200] [--out runs/bench/gpu]

Shapes: the ApolloMoE recipes (examples/apollomoe-0.5b.yaml, -1.5b.yaml: 24 / 28 layers, MoE in the last 2 with
7 family experts, hybrid-k routing), on one GPU (expert parallel 1); `tiny` is examples/tiny.yaml's model for a
CPU check of this script. Data: the bundled text corpora, preprocessed here and packed to --seq-length (token
ids of the small bundled tokenizer inside the models' full vocabulary; speed does not depend on the ids).

What is measured, all in this one call:
1. the GPU's matrix rate: a bf16 (and FP8, torch._scaled_mm) 8192^3 GEMM, TFLOP/s, the ceiling MFU is read against;
2. ours: `medmoe train` (a real run, its own process) for --steps steps; the steps after the first log interval
   give tokens/s, model TFLOP/s per GPU (training/flops.py: the FLOPs of the experts a token uses), MFU against
   the nominal peak (989 bf16 on H100/H200) and against the measured GEMM rate, and the peak memory of the run,
   next to `medmoe plan`'s estimate for the same layout;
3. the baseline in this process on the same micro-batches: bf16 autocast over fp32 weights with fused AdamW
   (what the Hugging Face Trainer does with --bf16), the same number of steps and micro-batches;
4. with --convergence-steps N (GPU, FP8 available): ours in bf16 and in FP8 for N steps on the same data; the
   mean loss of the last 10% of the steps, FP8 against bf16 (target: within 1%).
Prints a markdown table (for docs/benchmarks.md) and writes OUT/results.json.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SHAPES = {  # name: (recipe, stage)
    "0.5b": ("examples/apollomoe-0.5b.yaml", None),
    "1.5b": ("examples/apollomoe-1.5b.yaml", None),
    "tiny": ("examples/tiny.yaml", "cpt"),
}
GiB = 1024 ** 3


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def preprocess(out: str) -> str:
    prefix = os.path.join(out, "data", "bench_text")
    if not os.path.isfile(prefix + ".json"):
        subprocess.run([sys.executable, "-m", "megatron_medmoe", "preprocess", "--input",
                        os.path.join(ROOT, "examples", "data", "text", "*.jsonl"), "--tokenizer",
                        os.path.join(ROOT, "examples", "tokenizer"), "--format", "text", "--output-prefix", prefix,
                        "--quiet"], cwd=ROOT, env=clean_env(), check=True, capture_output=True)
    return prefix


def matrix_rate(device: str) -> dict:
    """TFLOP/s of a large GEMM: bf16 (fp32 on CPU) and, where the GPU has it, FP8 e4m3."""
    import torch

    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def rate(fn, repeats):
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e12

    result = {"gemm": "bf16" if device == "cuda" else "fp32", "tflops": rate(lambda: a @ b, 50 if device == "cuda" else 5)}
    if device == "cuda":
        try:
            a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
            one = torch.ones((), device=device)
            result["fp8_tflops"] = rate(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one,
                                                                 out_dtype=torch.bfloat16), 50)
        except (RuntimeError, AttributeError, TypeError) as e:
            result["fp8_error"] = str(e).splitlines()[0]
    return result


def shape_overrides(args, prefix: str, precision: str) -> list:
    over = ["parallel.expert=1", "moe.expert_slots=null", "parallel.data=1", "checkpoint.save=null",
            "checkpoint.load=null", "logging.tensorboard=false", f"data.datasets=[{{prefix: {prefix}}}]",
            "data.sampling=weighted", "data.packing=continuous", f"data.seq_length={args.seq_length}",
            f"training.micro_batch_size={args.micro_batch}", f"training.global_batch_size={args.global_batch}"]
    if precision == "fp8":
        over += ["training.precision=bf16", "fp8.format=hybrid", f"fp8.recipe={args.fp8_recipe}"]
    else:
        over += [f"training.precision={precision}"]
    return over


def resolved(shape: str, overrides: list):
    from megatron_medmoe.config import load_stages, resolve_config

    recipe, stage = SHAPES[shape]
    stages = load_stages(os.path.join(ROOT, recipe), overrides)
    cfg = next(s.config for s in stages if s.name == stage) if stage else stages[0].config
    return resolve_config(cfg, world_size=1)


def run_ours(args, shape: str, precision: str, prefix: str, steps: int, name: str) -> dict:
    recipe, stage = SHAPES[shape]
    out = os.path.join(args.out, "runs", name)
    over = shape_overrides(args, prefix, precision) + [
        f"training.train_steps={steps}", f"logging.log_interval={args.log_interval}", f"logging.output_dir={out}",
        "training.lr=1e-4", "training.min_lr=1e-5", "training.lr_warmup_fraction=null",
        f"training.lr_warmup_steps={min(20, max(steps // 10, 1))}"]
    cmd = [sys.executable, "-m", "megatron_medmoe", "train", os.path.join(ROOT, recipe), *over]
    if stage:
        cmd[4:4] = ["--stage", stage]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                              timeout=args.run_timeout)
    except subprocess.TimeoutExpired as e:  # the other rows still run, and the log says how far it got
        with open(os.path.join(args.out, f"{name}.log"), "w") as f:
            f.write((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))
        return {"error": f"timed out after {args.run_timeout} s (--run-timeout)"}
    with open(os.path.join(args.out, f"{name}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]}
    metrics_dir = os.path.join(out, stage) if stage else out
    with open(os.path.join(metrics_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    timed = records[1:] or records  # the first interval includes start-up and compilation
    return {
        "layers": layers_used(shape, args, prefix, precision),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "tflops": statistics.median(r["tflops_per_device"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed) if timed[0]["mfu"] is not None else None,
        "peak_memory_gib": max((r.get("peak_memory_gib", 0.0) for r in records), default=0.0) or None,
        "losses": [(r["step"], r["loss"]) for r in records],
    }


def layers_used(shape: str, args, prefix: str, precision: str) -> str:
    """transformer_engine or local: what `medmoe train` built for the row on this machine (model.transformer_impl
    auto builds TransformerEngine layers only where they import)."""
    from megatron_medmoe.model.backend import use_transformer_engine

    impl = resolved(shape, shape_overrides(args, prefix, precision)).model.transformer_impl
    return "transformer_engine" if use_transformer_engine(impl) else "local"


def free_gpu_memory() -> None:
    """Hand the cached blocks of this process back, so the next `medmoe train` child has the whole GPU."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def planned_memory_gib(shape: str, precision: str, args, prefix: str) -> float:
    from megatron_medmoe.languages import load_registry
    from megatron_medmoe.plan.memory import peak_memory

    cfg = resolved(shape, shape_overrides(args, prefix, precision))
    return peak_memory(cfg, load_registry(cfg.data.language_table).num_experts).total / GiB


def run_baseline(args, shape: str, prefix: str, steps: int, device: str) -> dict:
    """The released stack's approach on the same micro-batches our run trains on."""
    import torch

    from baseline_model import BaselineConfig, BaselineForCausalLM
    from megatron_medmoe.data.loader import TrainingData
    from megatron_medmoe.languages import load_registry
    from megatron_medmoe.training.flops import flops_per_token

    cfg = resolved(shape, shape_overrides(args, prefix, "bf16" if device == "cuda" else "fp32"))
    m, moe = cfg.model, cfg.moe
    registry = load_registry(cfg.data.language_table)
    config = BaselineConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                            num_key_value_heads=m.num_query_groups, rms_norm_eps=m.norm_epsilon,
                            rope_theta=m.rotary_base, tie_word_embeddings=m.tie_embeddings,
                            moe_last_n=moe.moe_last_n, num_experts=registry.num_experts, top_k=moe.topk,
                            hybrid=moe.routing == "hybrid")
    torch.manual_seed(cfg.training.seed)
    model = BaselineForCausalLM(config).to(device)
    fused = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    data = TrainingData(cfg, registry, total_rows=steps * cfg.training.global_batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)
    tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_length
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps):
        batches = data.micro_batches(step * cfg.training.global_batch_size, 0, 1)
        start = time.perf_counter()
        for batch in batches:
            tokens = batch["tokens"].to(device)
            with autocast:
                loss, _ = model(tokens, family_ids=batch["family_ids"].to(device), labels=tokens)
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[args.log_interval:] or times
    seconds = statistics.median(timed)
    tflops = flops_per_token(cfg, registry.num_experts) * tokens_per_step / seconds / 1e12
    return {"tokens_per_s": tokens_per_step / seconds, "tflops": tflops,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / GiB if device == "cuda" else None,
            "last_loss": float(loss.detach())}


def fp8_unavailable(args, prefix: str) -> str:
    """Why this machine cannot train the first shape in FP8 ('' when it can): `medmoe train`'s own check."""
    from megatron_medmoe.model.backend import BackendError, check_machine

    try:
        check_machine(resolved(args.shapes[0], shape_overrides(args, prefix, "fp8")))
    except BackendError as e:
        return str(e)
    return ""


def tail_mean(losses, share=0.1):
    values = [loss for _, loss in losses]
    n = max(1, round(len(values) * share))
    return sum(values[-n:]) / n


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b"], choices=sorted(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8", "fp32"])
    parser.add_argument("--fp8-recipe", default="blockwise", choices=["delayed", "tensorwise", "blockwise"])
    parser.add_argument("--steps", type=int, default=30, help="timed runs: optimizer steps (default 30)")
    parser.add_argument("--log-interval", type=int, default=10, help="steps per measurement; the first is warm-up")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--convergence-steps", type=int, default=200, help="FP8 vs bf16 loss after N steps; 0: skip")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--run-timeout", type=int, default=900, help="seconds each `medmoe train` run may take")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench", "gpu"))
    args = parser.parse_args()
    import torch

    from megatron_medmoe.runtime.quiet import silence_known_noise

    silence_known_noise()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precisions = args.precisions if device == "cuda" else ["fp32"]
    os.makedirs(args.out, exist_ok=True)
    prefix = preprocess(args.out)
    results = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name() if device == "cuda"
               else platform.processor() or platform.machine(), "torch": torch.__version__, "args": vars(args)}
    results["matrix_rate"] = rate = matrix_rate(device)
    free_gpu_memory()
    no_fp8 = fp8_unavailable(args, prefix)
    if "fp8" in args.precisions and no_fp8:
        results["fp8_skipped"] = no_fp8
    rows = []
    for shape in args.shapes:
        for precision in precisions:
            if precision == "fp8" and no_fp8:
                continue
            ours = run_ours(args, shape, precision, prefix, args.steps, f"{shape}-{precision}")
            if "error" not in ours:
                ours["planned_memory_gib"] = planned_memory_gib(shape, precision, args, prefix)
            rows.append({"shape": shape, "stack": "ours", "precision": precision, **ours})
        if not args.no_baseline:
            base = run_baseline(args, shape, prefix, args.steps, device)
            free_gpu_memory()
            rows.append({"shape": shape, "stack": "baseline (HF-style, expert loop)",
                         "precision": "bf16 autocast" if device == "cuda" else "fp32", **base})
    results["rows"] = rows
    if args.convergence_steps and device == "cuda" and not no_fp8:
        runs = {p: run_ours(args, args.shapes[0], p, prefix, args.convergence_steps, f"converge-{p}")
                for p in ("bf16", "fp8")}
        if all("error" not in r for r in runs.values()):
            bf16, fp8 = tail_mean(runs["bf16"]["losses"]), tail_mean(runs["fp8"]["losses"])
            results["convergence"] = {"shape": args.shapes[0], "steps": args.convergence_steps, "bf16_loss": bf16,
                                      "fp8_loss": fp8, "relative_difference": abs(fp8 - bf16) / bf16}
        else:
            results["convergence"] = {p: r.get("error") for p, r in runs.items()}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    print(f"{results['device']}, torch {results['torch']}, {results['date']}: {rate['gemm']} GEMM "
          f"{rate['tflops']:.4g} TFLOP/s" + (f", FP8 GEMM {rate['fp8_tflops']:.4g} TFLOP/s" if "fp8_tflops" in rate
                                             else ""))
    print(f"batch {args.global_batch} x {args.seq_length} tokens ({args.micro_batch} per micro-batch), steps "
          f"{args.steps}, the first {args.log_interval} not timed")
    if "fp8_skipped" in results:
        print(f"FP8 skipped: {results['fp8_skipped']}")
    print("\n| shape | stack | layers | precision | tokens/s | TFLOP/s | MFU (nominal) | MFU (measured GEMM) | peak "
          "memory GiB | planned GiB | vs baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        layers = row.get("layers", "hf-style")
        if "error" in row:
            print(f"| {row['shape']} | {row['stack']} | {layers} | {row['precision']} | failed: {row['error']} |||||||")
            continue
        base = next((r for r in rows if r["shape"] == row["shape"] and r["stack"].startswith("baseline")
                     and "error" not in r), None)
        speedup = row["tokens_per_s"] / base["tokens_per_s"] if base else None
        print(f"| {row['shape']} | {row['stack']} | {layers} | {row['precision']} | {row['tokens_per_s']:,.0f} | "
              f"{row['tflops']:.3g} | {fmt(row.get('mfu'), '.1%')} | {row['tflops'] / rate['tflops']:.1%} | "
              f"{fmt(row.get('peak_memory_gib'), '.1f')} | {fmt(row.get('planned_memory_gib'), '.3g')} | "
              f"{fmt(speedup, '.2f')}x |")
    if "convergence" in results:
        c = results["convergence"]
        if "relative_difference" in c:
            print(f"\nloss after {c['steps']} steps ({c['shape']}, mean of the last 10%): bf16 {c['bf16_loss']:.4f}, "
                  f"FP8 {c['fp8_loss']:.4f}, difference {c['relative_difference']:.2%}")
        else:
            print(f"\nconvergence runs failed: {c}")


if __name__ == "__main__":
    main()
