"""CPU step time of the tiny Post-MoE model per layout, and the cost of hybrid-k routing.

    python benchmarks/step_time.py [--steps 60] [--ab-steps 200]

1. `medmoe train examples/tiny_cpt.yaml` for TP1, TP2, EP2, PP2 (same global batch of 16 x 128 tokens):
   median milliseconds per step over the steps after the first log interval, and tokens/s.
2. Hybrid-k vs plain top-k routing, in this process on one rank: the tiny model's forward-backward step
   (4 micro-batches through megatron-core's schedule) with the routers switched between the two modes
   every step, so both see the same weights, data and machine state; and the router alone.
Prints markdown tables for docs/benchmarks.md.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
RECIPE = os.path.join(ROOT, "examples", "tiny_cpt.yaml")  # needs runs/data/tiny_text (make demo, or the tests)
SINGLE = ["parallel.expert=1", "moe.expert_slots=null"]
LAYOUTS = {"TP1 (1 process)": SINGLE, "TP2": SINGLE + ["parallel.tensor=2"], "EP2": ["parallel.expert=2"],
           "PP2": SINGLE + ["parallel.pipeline=2"]}


def train(overrides, steps, interval):
    """(median ms/step, median tokens/s, per-interval ms/step) after the first log interval."""
    with tempfile.TemporaryDirectory() as out:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env["CUDA_VISIBLE_DEVICES"] = ""
        subprocess.run([sys.executable, "-m", "megatron_medmoe", "train", RECIPE, *overrides,
                        f"training.train_steps={steps}", f"logging.log_interval={interval}", "checkpoint.save=null",
                        f"logging.output_dir={out}"], cwd=ROOT, env=env, check=True, capture_output=True)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f][1:]  # the first interval includes warm-up
    per_interval = [r["s_per_step"] * 1000 for r in records]
    return statistics.median(per_interval), statistics.median(r["tokens_per_s"] for r in records), per_interval


def single_rank():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_medmoe.runtime import cpu_compat
    from megatron_medmoe.runtime.launch import free_port

    if not dist.is_initialized():
        cpu_compat.apply_if_cpu()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        model_parallel_cuda_manual_seed(1)


def routing_ab(steps):
    """Median ms of a forward-backward step per routing mode, the modes alternating step by step."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_medmoe.config import load_config, resolve_config
    from megatron_medmoe.data.loader import TrainingData
    from megatron_medmoe.languages import load_registry
    from megatron_medmoe.model.gpt import build_model_chunks
    from megatron_medmoe.model.router import FamilyRouter
    from megatron_medmoe.training.loop import wrap_ddp
    from megatron_medmoe.training.step import make_forward_step

    single_rank()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = resolve_config(load_config(RECIPE, SINGLE + ["training.train_steps=1"]), world_size=1)
        data = TrainingData(cfg, load_registry())
    finally:
        os.chdir(cwd)
    model = wrap_ddp(build_model_chunks(cfg, 7), on_gpu=False)
    routers = [m for m in model[0].modules() if isinstance(m, FamilyRouter)]
    step_fn, schedule = make_forward_step(7), get_forward_backward_func()
    batch = data.micro_batches(0, 0, 1)
    times = {"hybrid": [], "topk": []}
    for step in range(2 * steps + 20):
        routing = "hybrid" if step % 2 == 0 else "topk"
        for router in routers:
            router.routing_mode = routing
        model[0].zero_grad_buffer()
        start = time.perf_counter()
        schedule(forward_step_func=step_fn, data_iterator=iter(batch), model=model, num_microbatches=len(batch),
                 seq_length=cfg.data.seq_length, micro_batch_size=cfg.training.micro_batch_size, forward_only=False)
        if step >= 20:  # warm-up
            times[routing].append((time.perf_counter() - start) * 1000)
    return times


def router_alone(routing, iterations=500):
    """Microseconds per forward + backward of one router on a micro-batch's 512 tokens."""
    import torch
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig

    from megatron_medmoe.model.router import FamilyRouter

    single_rank()
    config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_moe_experts=8,
                               moe_router_topk=2, add_bias_linear=False, moe_router_dtype="fp32",
                               use_cpu_initialization=True, moe_router_load_balancing_type="none")
    router = FamilyRouter(config, ProcessGroupCollection.use_mpu_process_groups(), routing=routing,
                          slot_of_expert=list(range(7))).train()
    router.set_layer_number(3)
    x = torch.randn(128, 4, 64, requires_grad=True)
    family = torch.randint(0, 7, (128, 4))
    for _ in range(50):
        router(x, family)[0].sum().backward()
    start = time.perf_counter()
    for _ in range(iterations):
        router(x, family)[0].sum().backward()
    return (time.perf_counter() - start) / iterations * 1e6


def machine():
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import megatron.core
    import torch

    return (f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, torch {torch.__version__}, "
            f"megatron-core {megatron.core.__version__}, {datetime.date.today().isoformat()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ab-steps", type=int, default=200, help="steps per routing mode in the A/B")
    args = parser.parse_args()
    interval = max(args.steps // 6, 1)
    print(f"Machine: {machine()}\n")
    print("| layout | processes | ms/step | tokens/s |\n|---|---|---|---|")
    for name, overrides in LAYOUTS.items():
        ms, tps, _ = train(overrides, args.steps, interval)
        procs = 1 if name.startswith("TP1") else 2
        print(f"| {name} | {procs} | {ms:.0f} | {tps:.0f} |", flush=True)
    times = routing_ab(args.ab_steps)
    alone = {routing: statistics.median(router_alone(routing) for _ in range(3)) for routing in ("hybrid", "topk")}
    hybrid, topk = statistics.median(times["hybrid"]), statistics.median(times["topk"])
    print("\n| routing | forward-backward step, ms (median; quartiles) | router forward+backward, us |\n|---|---|---|")
    for routing in ("hybrid", "topk"):
        q = statistics.quantiles(times[routing], n=4)
        print(f"| {routing} | {statistics.median(times[routing]):.1f} ({q[0]:.1f}-{q[2]:.1f}, "
              f"{len(times[routing])} steps) | {alone[routing]:.0f} |")
    print(f"\nhybrid-k vs plain top-k: step time {100 * (hybrid / topk - 1):+.1f}% (target: within 3%), "
          f"router alone {100 * (alone['hybrid'] / alone['topk'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
