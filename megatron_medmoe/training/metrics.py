"""Training metrics: loss overall and per family, learning rate, gradient norm, throughput (tokens/s,
TFLOP/s per device, MFU), and per MoE layer the share of tokens per expert, the imbalance (max/mean) and
how often the router's own top-k already held the family expert.

Each rank adds up what it saw between log steps; one all-reduce over the job at each log step makes the
totals (only the last pipeline stage has losses, only the ranks holding a MoE layer count its routing).
A validation (training/validation.py) is a record of its own, `{"step": S, "validation": {...}}`, and so is a
dev-set accuracy (training/mcq_dev.py), `{"step": S, "mcq_dev": {...}}`.
Rank 0 prints a console line, appends a JSON record to OUTPUT_DIR/metrics.jsonl and hands it to the
TensorBoard and Weights & Biases writers. A run resumed from the checkpoint of step S first drops the records of
steps after S (the crashed run's, which the resumed run logs again), so the file holds one record per step.
MoE layers are numbered 1..num_layers over the whole model, as megatron-core and `medmoe analyze routing` do.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..languages import LanguageRegistry
from ..model.router import FamilyRouter
from ..runtime.distributed import collective_device
from .flops import flops_per_token, peak_tflops


def _record_step(line: str) -> Optional[int]:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def supersede_records(path: str, resumed_at: int) -> None:
    """Keep the records of metrics.jsonl up to step `resumed_at`, in order; drop the later ones (logged by the run
    that crashed after its last checkpoint) and any torn line. Rewritten atomically: a crash leaves either file."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line if line.endswith("\n") else line + "\n" for line in lines
            if (step := _record_step(line)) is not None and step <= resumed_at]
    if kept == lines:
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TrainingMetrics:
    def __init__(self, chunks, registry: LanguageRegistry, cfg: RunConfig, writers=(), resumed: bool = False,
                 resumed_at: Optional[int] = None):
        """resumed: append to this stage's metrics.jsonl; resumed_at: the step the run resumes from (implies
        resumed): the records after it are dropped first."""
        self.registry = registry
        self.num_families = registry.num_experts
        self.first_moe_layer = cfg.model.num_layers - cfg.moe.moe_last_n + 1  # megatron-core layer numbers start at 1
        self.moe_last_n = cfg.moe.moe_last_n
        self.routers: List[FamilyRouter] = [m for c in chunks for m in c.modules() if isinstance(m, FamilyRouter)]
        self.flops_per_token = flops_per_token(cfg, registry.num_experts)
        self.peak = peak_tflops(cfg)
        self.writers = list(writers)
        self.path = os.path.join(cfg.logging.output_dir, "metrics.jsonl")
        if dist.get_rank() == 0:
            if resumed_at is not None:
                supersede_records(self.path, resumed_at)
            elif not resumed:  # a new run starts a new record
                os.makedirs(cfg.logging.output_dir, exist_ok=True)
                open(self.path, "w").close()
        self._reset()

    def _reset(self):
        self.loss = torch.zeros(2, dtype=torch.float64)  # sum, tokens
        self.family = torch.zeros(2, self.num_families, dtype=torch.float64)
        self.steps = 0
        self.skipped = 0
        self.tokens = 0
        self.grad_norm_sum = 0.0
        self.started = time.perf_counter()

    def add_step(self, report: Dict[str, torch.Tensor], grad_norm: Optional[float], updated: bool, tokens: int):
        if report:
            self.loss += report["lm loss"].double().cpu()
            self.family += report["family loss"].double().cpu()
        self.steps += 1
        self.skipped += 0 if updated else 1
        self.tokens += tokens
        self.grad_norm_sum += grad_norm or 0.0

    def _expert_counts(self) -> torch.Tensor:
        counts = torch.zeros(max(self.moe_last_n, 1), 3 + self.num_families, dtype=torch.float64)
        for router in self.routers:
            row = router.layer_number - self.first_moe_layer
            counts[row, :self.num_families] += router.stats.tokens_per_expert
            counts[row, -3] += router.stats.family_held
            counts[row, -2] += router.stats.family_checked
            counts[row, -1] = 1.0  # this rank has the layer
            router.stats.reset()
        return counts

    def log(self, step: int, lr: float) -> Optional[dict]:
        """Reduce over the job; returns (and on rank 0 prints and records) the interval's metrics."""
        flat = torch.cat([self.loss, self.family.reshape(-1), self._expert_counts().reshape(-1)])
        flat = flat.to(collective_device())
        dist.all_reduce(flat)
        flat = flat.cpu()
        n_fam = self.num_families
        loss = flat[:2]
        family = flat[2:2 + 2 * n_fam].reshape(2, n_fam)
        experts = flat[2 + 2 * n_fam:].reshape(max(self.moe_last_n, 1), 3 + n_fam)
        elapsed = time.perf_counter() - self.started
        tflops = self.flops_per_token * self.tokens / max(elapsed, 1e-9) / dist.get_world_size() / 1e12
        record = {
            "step": step,
            "loss": float(loss[0] / loss[1]) if loss[1] > 0 else float("nan"),
            "lr": lr,
            "grad_norm": self.grad_norm_sum / max(self.steps, 1),
            "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "s_per_step": elapsed / max(self.steps, 1),
            "skipped_steps": self.skipped,
            "family_loss": {self.registry.experts[i]: float(family[0, i] / family[1, i])
                            for i in range(n_fam) if family[1, i] > 0},
        }
        if torch.cuda.is_available():  # the largest peak over the ranks since the start
            peak = torch.tensor([float(torch.cuda.max_memory_allocated())], device=collective_device())
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            record["peak_memory_gib"] = float(peak.item()) / 1024 ** 3
        if self.moe_last_n > 0:
            layers = {}
            for row in range(self.moe_last_n):
                tokens = experts[row, :n_fam]
                total = float(tokens.sum())
                if total == 0:
                    continue
                share = tokens / total
                entry = {"expert_share": [round(float(x), 4) for x in share],
                         "imbalance": float(share.max() / share.mean())}
                checked = float(experts[row, -2])
                if checked > 0:
                    entry["family_in_own_topk"] = float(experts[row, -3]) / checked
                layers[str(self.first_moe_layer + row)] = entry
            record["moe_layers"] = layers
        self._reset()
        if dist.get_rank() == 0:
            self._print(record)
            self._emit(record)
        return record

    def log_validation(self, step: int, result: dict) -> dict:
        """Record a validation (training/validation.py's result, the same on every rank); its time is kept out of
        the training throughput of the interval it falls in."""
        self.started += result["seconds"]
        loss = result["loss"]
        record = {"step": step, "validation": {
            "loss": loss, "ppl": math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("nan"),
            "tokens": result["tokens"], "seconds": result["seconds"],
            "family_loss": {self.registry.experts[i]: value for i, value in result["family_loss"].items()},
            "family_tokens": {self.registry.experts[i]: value for i, value in result["family_tokens"].items()}}}
        if dist.get_rank() == 0:
            v = record["validation"]
            print(f"validation at step {step:6d} | loss {v['loss']:.4f} | PPL {v['ppl']:.4g} | {v['tokens']:,} tokens "
                  f"| {v['seconds']:.1f} s", flush=True)
            print("    validation loss by family: "
                  + " | ".join(f"{name} {value:.3f}" for name, value in v["family_loss"].items()), flush=True)
            self._emit(record)
        return record

    def log_mcq_dev(self, step: int, result: dict) -> dict:
        """Record a dev-set accuracy (training/mcq_dev.py's result, the same on every rank), its time kept out of
        the training throughput."""
        self.started += result["seconds"]
        record = {"step": step, "mcq_dev": result}
        if dist.get_rank() == 0:
            averages = " | ".join(f"{tier} {result[f'{tier}_average']:.1%}" for tier in ("major", "minor")
                                  if result[f"{tier}_average"] is not None)
            print(f"mcq dev at step {step:6d} | accuracy {result['accuracy']:.1%} of {result['questions']} questions"
                  + (f" | {averages}" if averages else "")
                  + (f" | {result['truncated']} prompts cut to data.seq_length" if result["truncated"] else "")
                  + f" | {result['seconds']:.1f} s", flush=True)
            print("    mcq dev accuracy by language: "
                  + " | ".join(f"{code} {value:.1%}" for code, value in result["per_language"].items()), flush=True)
            self._emit(record)
        return record

    def _emit(self, record: dict) -> None:
        """Rank 0: append the record to metrics.jsonl and hand it to the TensorBoard / W&B writers."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for writer in self.writers:
            writer.write(record)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def _print(self, r: dict):
        print(f"step {r['step']:6d} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | grad norm {r['grad_norm']:.3f} | "
              f"{r['tokens_per_s']:.0f} tokens/s | {r['tflops_per_device']:.3g} TFLOP/s per device"
              + (f" (MFU {r['mfu']:.1%})" if r["mfu"] is not None else "") + f" | {r['s_per_step'] * 1000:.0f} ms/step"
              + (f" | peak memory {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else "")
              + (f" | skipped {r['skipped_steps']}" if r["skipped_steps"] else ""), flush=True)
        fams = " | ".join(f"{name} {value:.3f}" for name, value in r["family_loss"].items())
        print(f"    loss by family: {fams}", flush=True)
        for layer, entry in r.get("moe_layers", {}).items():
            shares = " ".join(f"{x:.2f}" for x in entry["expert_share"])
            held = entry.get("family_in_own_topk")
            print(f"    layer {layer} expert share: {shares} (max/mean {entry['imbalance']:.2f})"
                  + (f", family already in router top-k {held:.0%}" if held is not None else ""), flush=True)
