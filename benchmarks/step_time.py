"""CPU step time of the tiny Post-MoE model per layout, and the cost of hybrid-k routing.

    python benchmarks/step_time.py [--steps 60] [--ab-steps 200] [--only layouts|routing|metrics]

1. `medmoe train examples/tiny.yaml --stage cpt` for TP1, TP2, EP2, PP2 (same global batch of 16 x 128 tokens):
   median milliseconds per step over the steps after the first log interval, and tokens/s.
2. Hybrid-k vs plain top-k routing, in this process on one rank: the tiny model's forward-backward step
   (4 micro-batches through megatron-core's schedule) with the routers switched between the two modes
   every step, so both see the same weights, data and machine state; and the router alone.
3. Per-family metrics on vs off, the same way: loss per family, tokens per expert, family hits and the
   metrics records against a loss summed over tokens only.
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
RECIPE = os.path.join(ROOT, "examples", "tiny.yaml")  # needs runs/data/tiny_text (make demo, or the tests)
SINGLE = ["parallel.expert=1", "moe.expert_slots=null"]
LAYOUTS = {"TP1 (1 process)": SINGLE, "TP2": SINGLE + ["parallel.tensor=2"], "EP2": ["parallel.expert=2"],
           "PP2": SINGLE + ["parallel.pipeline=2"]}


def train(overrides, steps, interval):
    """(median ms/step, median tokens/s, per-interval ms/step) after the first log interval."""
    with tempfile.TemporaryDirectory() as out:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env["CUDA_VISIBLE_DEVICES"] = ""
        subprocess.run([sys.executable, "-m", "megatron_medmoe", "train", RECIPE, "--stage", "cpt", *overrides,
                        f"training.train_steps={steps}", f"logging.log_interval={interval}", "checkpoint.save=null",
                        f"logging.output_dir={out}"], cwd=ROOT, env=env, check=True, capture_output=True)
        with open(os.path.join(out, "cpt", "metrics.jsonl")) as f:
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


def one_rank_model():
    """The tiny cpt stage on one rank: (config, micro-batches of step 1, DDP-wrapped model chunks)."""
    from megatron_medmoe.config import load_stages, resolve_config
    from megatron_medmoe.data.loader import TrainingData
    from megatron_medmoe.languages import load_registry
    from megatron_medmoe.model.gpt import build_model_chunks
    from megatron_medmoe.training.loop import wrap_ddp

    single_rank()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        stages = load_stages(RECIPE, SINGLE + ["training.train_steps=1"])
        cfg = resolve_config(next(s.config for s in stages if s.name == "cpt"), world_size=1)
        data = TrainingData(cfg, load_registry())
    finally:
        os.chdir(cwd)
    return cfg, data.micro_batches(0, 0, 1), wrap_ddp(build_model_chunks(cfg, 7), cfg, on_gpu=False)


def alternate(cfg, batch, model, variants, steps, warmup=20):
    """Median-ready ms per forward-backward step of each variant, the variants taking turns step by step.

    `variants` maps a name to (prepare(), forward_step_func, after(reports)); all see the same weights and data.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    schedule = get_forward_backward_func()
    names = list(variants)
    times = {name: [] for name in names}
    for step in range(len(names) * (steps + warmup)):
        name = names[step % len(names)]
        prepare, step_fn, after = variants[name]
        prepare()
        model[0].zero_grad_buffer()
        start = time.perf_counter()
        reports = schedule(forward_step_func=step_fn, data_iterator=iter(batch), model=model,
                           num_microbatches=len(batch), seq_length=cfg.data.seq_length,
                           micro_batch_size=cfg.training.micro_batch_size, forward_only=False)
        after(reports)
        if step >= len(names) * warmup:
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def routing_ab(steps):
    """Median ms of a forward-backward step per routing mode, the modes alternating step by step."""
    from megatron_medmoe.model.router import FamilyRouter
    from megatron_medmoe.training.step import make_forward_step

    cfg, batch, model = one_rank_model()
    routers = [m for m in model[0].modules() if isinstance(m, FamilyRouter)]

    def mode(routing):
        def prepare():
            for router in routers:
                router.routing_mode = routing
        return prepare

    step_fn = make_forward_step(7)
    return alternate(cfg, batch, model, {r: (mode(r), step_fn, lambda reports: None) for r in ("hybrid", "topk")},
                     steps)


def metrics_ab(steps, log_interval=10):
    """Per-family metrics on vs off, alternating step by step. On: the loss function's sums per family, the
    routers counting tokens per expert and family hits, TrainingMetrics adding up every step and logging (JSON
    record, console line) every `log_interval` of its steps. Off: the loss summed over tokens only, no counting."""
    import contextlib
    import io
    from functools import partial

    import torch

    from megatron_medmoe.languages import load_registry
    from megatron_medmoe.model.router import FamilyRouter
    from megatron_medmoe.training.metrics import TrainingMetrics
    from megatron_medmoe.training.step import make_forward_step, sum_reports

    cfg, batch, model = one_rank_model()
    routers = [m for m in model[0].modules() if isinstance(m, FamilyRouter)]
    tokens = cfg.training.global_batch_size * cfg.data.seq_length

    def plain_loss(per_token_loss, loss_mask):
        mask = loss_mask.float().reshape(-1)
        loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
        return loss_sum, mask.sum().to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}

    def plain_step(data_iterator, chunk):
        b = next(data_iterator)
        out = chunk(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"],
                    family_ids=b["family_ids"])
        return out, partial(plain_loss, loss_mask=b["loss_mask"])

    def counting(on):
        def prepare():
            for router in routers:
                if on:
                    router.__dict__.pop("_count", None)
                else:
                    router._count = lambda *args: None
        return prepare

    with tempfile.TemporaryDirectory() as out:
        cfg.logging.output_dir = out
        metrics = TrainingMetrics(model, load_registry(), cfg)
        logged = [0]

        def record(reports):
            metrics.add_step(sum_reports(reports), 1.0, True, tokens)
            logged[0] += 1
            if logged[0] % log_interval == 0:
                with contextlib.redirect_stdout(io.StringIO()):
                    metrics.log(logged[0], 1e-3)

        return alternate(cfg, batch, model, {"on": (counting(True), make_forward_step(7), record),
                                             "off": (counting(False), plain_step, lambda reports: None)}, steps)


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


def layouts_table(steps):
    interval = max(steps // 6, 1)
    print("| layout | processes | ms/step | tokens/s |\n|---|---|---|---|")
    for name, overrides in LAYOUTS.items():
        ms, tps, _ = train(overrides, steps, interval)
        procs = 1 if name.startswith("TP1") else 2
        print(f"| {name} | {procs} | {ms:.0f} | {tps:.0f} |", flush=True)


def ab_table(times, title):
    print(f"\n| {title} | forward-backward step, ms (median; quartiles) |\n|---|---|")
    for name, values in times.items():
        q = statistics.quantiles(values, n=4)
        print(f"| {name} | {statistics.median(values):.1f} ({q[0]:.1f}-{q[2]:.1f}, {len(values)} steps) |")


def routing_table(steps):
    times = routing_ab(steps)
    alone = {routing: statistics.median(router_alone(routing) for _ in range(3)) for routing in ("hybrid", "topk")}
    ab_table(times, "routing")
    print(f"\nrouter alone (forward+backward, 512 tokens): hybrid {alone['hybrid']:.0f} us, top-k {alone['topk']:.0f} us")
    hybrid, topk = statistics.median(times["hybrid"]), statistics.median(times["topk"])
    print(f"hybrid-k vs plain top-k: step time {100 * (hybrid / topk - 1):+.1f}% (target: within 3%), "
          f"router alone {100 * (alone['hybrid'] / alone['topk'] - 1):+.1f}%")


def metrics_table(steps):
    times = metrics_ab(steps)
    ab_table(times, "per-family metrics")
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"\nper-family metrics: step time {100 * (on / off - 1):+.1f}% (target: under 2%)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ab-steps", type=int, default=200, help="steps per variant in the A/Bs")
    parser.add_argument("--only", choices=["layouts", "routing", "metrics"], help="run one part only")
    args = parser.parse_args()
    print(f"Machine: {machine()}\n")
    if args.only in (None, "layouts"):
        layouts_table(args.steps)
    if args.only in (None, "routing"):
        routing_table(args.ab_steps)
    if args.only in (None, "metrics"):
        metrics_table(args.ab_steps)


if __name__ == "__main__":
    main()
