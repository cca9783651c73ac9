"""`medmoe analyze routing`: how each language's tokens spread over the experts, layer by layer.

Eval mode, plain top-k (the inference rule): for every MoE layer, how often each expert is chosen (a token
counts k times) divided by the layer's total, per language: a layers x experts matrix of routing ratios,
each row summing to 1. Also the share of tokens whose top-k holds their own family expert. A model with MoE
in every layer shows the ApolloMoE observation ("spread out in the end"): early layers share experts across
languages, late layers send each language to its own. Outputs in --output: routing.csv (one row per
language, layer and expert), family_share.csv, and one heatmap per language, routing_LANG.png. Layers are
numbered 1..num_layers over the whole model (megatron-core's layer_number), as in the training log and
metrics.jsonl: the tiny recipe's MoE layers are 3 and 4.
"""
from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..inference.ranks import is_rank0
from ..runtime.env import DistEnv
from ..runtime.exit_codes import EXIT_INPUT, EXIT_OK
from .inputs import INPUT_ERRORS, AnalysisInputs, language_batches, open_analysis
from .lape_stats import plot_matrix


@dataclass
class RoutingOptions(AnalysisInputs):
    routing: Optional[str] = None  # null: the checkpoint's routing mode (hybrid routes plain top-k in eval)


class RoutingCounter:
    """Per language: expert choices [moe layers, experts] and tokens holding their family expert; `layers` are the
    MoE layers' numbers (1-based, over the whole model)."""

    def __init__(self, model, languages: List[str], num_experts: int):
        from ..model.router import FamilyRouter

        self.routers = [(layer.layer_number, layer.mlp.router) for layer in model.decoder.layers
                        if isinstance(getattr(layer.mlp, "router", None), FamilyRouter)]
        if not self.routers:
            raise ValueError("the model has no MoE layers: nothing is routed")
        self.layers = [number for number, _ in self.routers]
        self.language: Optional[str] = None
        self.family: Optional[int] = None
        self.family_of: Dict[str, int] = {}
        self.chosen = {lang: torch.zeros(len(self.routers), num_experts, dtype=torch.float64) for lang in languages}
        self.held = {lang: torch.zeros(len(self.routers), dtype=torch.float64) for lang in languages}
        self.tokens = {lang: torch.zeros(len(self.routers), dtype=torch.float64) for lang in languages}
        self._handles = []

    def __enter__(self):
        self._handles = [router.register_forward_hook(self._hook(i)) for i, (_, router) in enumerate(self.routers)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _hook(self, i: int):
        def hook(router, args, output):
            routing_map = output[1][:, router.slot_of_expert.to(output[1].device)]  # slots -> experts
            chosen = routing_map.to(torch.float64).cpu()
            self.chosen[self.language][i] += chosen.sum(0)
            self.held[self.language][i] += chosen[:, self.family].sum()
            self.tokens[self.language][i] += chosen.shape[0]
        return hook

    def ratios(self, lang: str) -> torch.Tensor:
        totals = self.chosen[lang].sum(1, keepdim=True)
        return torch.where(totals > 0, self.chosen[lang] / totals.clamp_min(1), torch.zeros_like(self.chosen[lang]))

    def family_share(self, lang: str) -> torch.Tensor:
        return self.held[lang] / self.tokens[lang].clamp_min(1)


def _use_routing(loaded, routing: Optional[str]) -> None:
    if routing is None:
        return
    from ..model.router import FamilyRouter

    for module in loaded.model.modules():
        if isinstance(module, FamilyRouter):
            if routing == "hard":
                module.topk = 1
            module.routing_mode = routing


def run_routing(opts: RoutingOptions, env: DistEnv) -> int:
    try:
        loaded, texts = open_analysis(opts, env)
        counter = RoutingCounter(loaded.model, list(texts), loaded.registry.num_experts)
    except (*INPUT_ERRORS, ValueError) as e:
        print(f"medmoe analyze routing: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    _use_routing(loaded, opts.routing)
    with counter:
        for lang, text in texts.items():
            counter.language = lang
            counter.family = counter.family_of[lang] = loaded.registry.expert_id(lang)
            for tokens, family in language_batches(loaded, text, opts.batch_size):
                loaded.logits(tokens, family)
    if is_rank0():
        write_routing(opts.output, counter, loaded.registry.experts)
    return EXIT_OK


def write_routing(output: str, counter: RoutingCounter, experts: List[str]) -> None:
    os.makedirs(output, exist_ok=True)
    rows: Dict[str, List[list]] = {"routing.csv": [["language", "layer", "expert", "expert_name", "ratio"]],
                                   "family_share.csv": [["language", "family_expert", "layer", "share"]]}
    layers = [str(n) for n in counter.layers]
    for lang in counter.chosen:
        ratios, share = counter.ratios(lang), counter.family_share(lang)
        for i, layer in enumerate(counter.layers):
            rows["routing.csv"] += [[lang, layer, e, name, f"{float(ratios[i, e]):.6f}"] for e, name in enumerate(experts)]
            rows["family_share.csv"].append([lang, experts[counter.family_of[lang]], layer, f"{float(share[i]):.6f}"])
        plot_matrix(ratios, layers, list(experts), os.path.join(output, f"routing_{lang}.png"),
                    f"routing ratios: {lang}", "layer", "expert")
        print(f"{lang}: family expert in top-k for " + ", ".join(
            f"layer {layer} {float(share[i]):.0%}" for i, layer in enumerate(counter.layers)), flush=True)
    for name, table in rows.items():
        tmp = os.path.join(output, f".{name}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(table)
        os.replace(tmp, os.path.join(output, name))
    print(f"wrote {output}", flush=True)
