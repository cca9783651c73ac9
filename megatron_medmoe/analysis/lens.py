"""The `lens` training stage (training.objective=lens): Lens language-subspace tuning of a checkpoint.

1. Probing, with the starting model frozen: every parallel item of lens.parallel_data is asked in the chat
   format (`User:{text}\\nAssistant:`) in every language; the last prompt token's hidden state of every
   layer (the last one after the final norm) gives each layer's language subspaces (lens_math.probe),
   saved to OUTPUT_DIR/lens_subspaces.pt.
2. Training: only the top lens.trainable_layers decoder layers (all their parameters) learn; embeddings,
   lower layers, final norm and output layer stay frozen. The frozen copy of the spec is the starting model:
   its last-layer states h_ref are fixed for fixed prompts, so they are computed once before training.
   Each step takes training.global_batch_size items (an epoch is every item once, reshuffled per epoch)
   and minimises the three Lens losses on the last layer's last prompt-token state (lens_math.lens_losses),
   with AdamW and the stage's learning-rate schedule. No language-model loss.
3. The trained weights are saved as the stage's final checkpoint (weights only), loadable by every tool.

Runs in one process (the stage's layout must be 1 x 1 x 1); metrics go to OUTPUT_DIR/metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import random
from typing import Dict, List, Tuple

import torch

from ..config import RunConfig
from ..runtime.env import DistEnv
from ..runtime.exit_codes import EXIT_OK
from .lens_math import LayerSubspace, lens_losses, probe, save_subspaces


class LensDataError(ValueError):
    """A parallel data file Lens cannot use; names the file and line."""


def read_parallel(path: str, anchor: str, languages: List[str]) -> Tuple[List[str], List[Dict[str, str]]]:
    """(target languages, items {lang: text}) from a JSONL file of parallel items."""
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LensDataError(f"{path}:{number}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise LensDataError(f"{path}:{number}: expected an object {{lang: text, ...}}")
            items.append((number, {k: v for k, v in record.items() if k != "id"}))
    if not items:
        raise LensDataError(f"{path}: no parallel items")
    targets = languages or [lang for lang in items[0][1] if lang != anchor]
    if not targets:
        raise LensDataError(f"{path}: no language besides the anchor {anchor!r}")
    for number, item in items:
        missing = [lang for lang in [anchor, *targets] if not isinstance(item.get(lang), str) or not item[lang].strip()]
        if missing:
            raise LensDataError(f"{path}:{number}: no text for {missing}")
    return targets, [item for _, item in items]


class LastTokenStates:
    """Hidden states at each row's last prompt token: every decoder layer's output, the last one after the
    final norm (forward hooks; gradients flow through them)."""

    def __init__(self, model):
        self.model = model
        self.outputs: Dict[int, torch.Tensor] = {}
        layers = list(model.decoder.layers)
        self._handles = [layer.register_forward_hook(self._keep(i)) for i, layer in enumerate(layers[:-1])]
        self._handles.append(model.decoder.final_layernorm.register_forward_hook(self._keep(len(layers) - 1)))

    def _keep(self, index: int):
        def hook(module, args, output):
            self.outputs[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def run(self, rows: List[List[int]], family: int) -> Dict[int, torch.Tensor]:
        """{layer: [rows, hidden]} at each row's last token (rows right-padded: causal attention keeps the
        padding out)."""
        from ..data.batches import causal_mask

        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
        positions = torch.arange(width).unsqueeze(0).expand(len(rows), -1)
        self.outputs = {}
        self.model(tokens, positions, causal_mask(width), family_ids=torch.full_like(tokens, family))
        last = torch.tensor([len(r) - 1 for r in rows])
        return {i: out[last, torch.arange(len(rows))] for i, out in self.outputs.items()}  # out is [s, b, h]

    def close(self):
        for h in self._handles:
            h.remove()


def _schedule(cfg: RunConfig):
    tr = cfg.training
    steps = max(tr.train_steps, 1)
    warmup = round(tr.lr_warmup_fraction * steps) if tr.lr_warmup_fraction is not None else tr.lr_warmup_steps

    def lr(step: int) -> float:  # step counts from 0
        if step < warmup:
            return tr.lr * (step + 1) / warmup
        progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
        if tr.lr_decay_style == "constant":
            return tr.lr
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if tr.lr_decay_style == "cosine" else 1 - progress
        return tr.min_lr + (tr.lr - tr.min_lr) * decay
    return lr


def run_lens(cfg: RunConfig, env: DistEnv) -> int:
    from ..convert.mcore_to_hf import find_tokenizer
    from ..data.tokenizer import TokenizerError, load_fast_tokenizer
    from ..languages import load_registry
    from ..model.gpt import build_model_chunks
    from ..runtime.device import gpu_code_path
    from ..runtime.distributed import initialize_distributed, shutdown_distributed
    from ..training.checkpoint import CheckpointError, TrainState, current_layout, load_checkpoint, save_checkpoint
    from ..training.checkpoint_paths import find_checkpoint

    if not cfg.checkpoint.load:
        raise CheckpointError("training.objective=lens tunes a trained model: set checkpoint.load (or run it as a "
                              "later stage of a recipe)")
    targets, items = read_parallel(cfg.lens.parallel_data, cfg.lens.anchor, cfg.lens.languages)
    registry = load_registry(cfg.data.language_table)
    for lang in [cfg.lens.anchor, *targets]:
        registry.language(lang)
    tokenizer_dir = find_tokenizer(cfg.checkpoint.load, cfg, None) or \
        find_tokenizer(os.path.dirname(find_checkpoint(cfg.checkpoint.load)), cfg, None)
    if tokenizer_dir is None:
        raise TokenizerError(f"no tokenizer beside {cfg.checkpoint.load} or its datasets")
    tokenizer = load_fast_tokenizer(tokenizer_dir)
    encode = lambda text: tokenizer.backend.encode(f"User:{text}\nAssistant:", add_special_tokens=False).ids  # noqa
    prompts = {lang: [encode(item[lang]) for item in items] for lang in [cfg.lens.anchor, *targets]}

    initialize_distributed(cfg, env)
    cfg.fusions.gradient_accumulation = False  # trained without DDP: no main gradients to accumulate into
    try:
        (model,) = build_model_chunks(cfg, registry.num_experts)
        load_checkpoint(cfg.checkpoint.load, [model], cfg)
        model = model.float()
        states = LastTokenStates(model)
        subspace, reference = _probe(model, states, prompts, cfg, registry)
        trainable = _freeze_all_but_top(model, cfg.lens.trainable_layers)
        _train(model, states, prompts, reference, subspace, trainable, cfg, registry)
        states.close()
        if cfg.checkpoint.save:
            layout = current_layout(cfg, gpu_code_path())
            save_checkpoint(cfg.checkpoint.save, TrainState(iteration=cfg.training.train_steps, layout=layout),
                            [model], cfg)
            print(f"saved the Lens-tuned weights to {cfg.checkpoint.save} (step {cfg.training.train_steps})", flush=True)
    finally:
        shutdown_distributed()
    return EXIT_OK


@torch.no_grad()
def _probe(model, states: LastTokenStates, prompts, cfg: RunConfig, registry):
    """Per-layer subspaces from the first lens.probe_items items; the frozen model's last-layer states of
    every item (the reference the losses compare against)."""
    model.eval()
    n = min(cfg.lens.probe_items, len(next(iter(prompts.values()))))
    per_layer: Dict[int, Dict[str, torch.Tensor]] = {}
    reference: Dict[str, torch.Tensor] = {}
    size = cfg.training.micro_batch_size
    for lang, rows in prompts.items():
        family = registry.expert_id(lang)
        outputs = [states.run(rows[i:i + size], family) for i in range(0, len(rows), size)]
        hidden = {layer: torch.cat([o[layer] for o in outputs]) for layer in outputs[0]}
        for layer, states_of_layer in hidden.items():
            per_layer.setdefault(layer, {})[lang] = states_of_layer[:n].double()
        reference[lang] = hidden[max(hidden)]
    subspaces = {layer: probe(hidden, cfg.lens.anchor) for layer, hidden in per_layer.items()}
    os.makedirs(cfg.logging.output_dir, exist_ok=True)
    save_subspaces(subspaces, os.path.join(cfg.logging.output_dir, "lens_subspaces.pt"))
    print(f"probed {len(subspaces)} layers on {n} parallel items in {len(prompts)} languages", flush=True)
    return subspaces[max(subspaces)], reference


def _freeze_all_but_top(model, n: int) -> List[torch.nn.Parameter]:
    """Only the top n decoder layers' parameters train (padding expert slots stay frozen as built)."""
    trainable = [p for layer in list(model.decoder.layers)[-n:] for p in layer.parameters() if p.requires_grad]
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return trainable


def _train(model, states: LastTokenStates, prompts, reference, subspace: LayerSubspace, trainable, cfg: RunConfig,
           registry) -> None:
    tr, lens = cfg.training, cfg.lens
    optimizer = torch.optim.AdamW(trainable, lr=tr.lr, betas=(tr.adam_beta1, tr.adam_beta2), eps=tr.adam_eps,
                                  weight_decay=tr.weight_decay)
    lr_at = _schedule(cfg)
    # eval mode while training: MoE layers route plain top-k as at inference (and as the reference states were
    # computed), not with the family expert forced; dropout is 0 in these models either way
    model.eval()
    order: List[int] = []
    rng = random.Random(tr.seed)
    count = len(next(iter(prompts.values())))
    log = open(os.path.join(cfg.logging.output_dir, "metrics.jsonl"), "w", encoding="utf-8")  # a new run
    targets = [lang for lang in prompts if lang != lens.anchor]
    for step in range(tr.train_steps):
        batch = []
        while len(batch) < tr.global_batch_size:
            if not order:
                order = list(range(count))
                rng.shuffle(order)
            batch.append(order.pop())
        rows = lambda lang: [prompts[lang][i] for i in batch]  # noqa: E731
        h_en = states.run(rows(lens.anchor), registry.expert_id(lens.anchor))
        last = max(h_en)
        h_k = {lang: states.run(rows(lang), registry.expert_id(lang))[last] for lang in targets}
        ref = lambda lang: reference[lang][batch]  # noqa: E731
        losses = lens_losses(h_en[last], ref(lens.anchor), h_k, {lang: ref(lang) for lang in targets}, subspace,
                             lens.alpha, lens.w_retain, lens.w_agn)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if tr.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(trainable, tr.clip_grad)
        optimizer.step()
        record = {"step": step + 1, **{key: float(losses[name].detach()) for key, name in
                                       (("loss", "total"), ("retain", "retain"), ("spec", "spec"), ("agn", "agn"))},
                  "lr": lr_at(step)}
        log.write(json.dumps(record) + "\n")
        log.flush()
        if (step + 1) % cfg.logging.log_interval == 0 or step + 1 == tr.train_steps:
            print(f"lens step {step + 1}/{tr.train_steps}: loss {record['loss']:.4e} (retain {record['retain']:.3e}, "
                  f"spec {record['spec']:.3e}, agn {record['agn']:.3e}) lr {record['lr']:.2e}", flush=True)
    log.close()
