"""`medmoe convert hf-to-mcore`: a Hugging Face Qwen2 / Qwen2-MoE / ApolloMoE directory to our checkpoint.

The output is a save directory holding one layout-free torch_dist checkpoint (iter_0000000, weights
only) with its run_config.yaml and manifest.json, and the source's tokenizer files; `medmoe train` loads
it under any TP/PP/EP with `checkpoint.load=OUT checkpoint.finetune=true`. A dense Qwen2 can be upcycled
on the way (`upcycle_last_n`): every expert of the last N layers copies that layer's dense MLP, routers
are fresh.
Tensors are read, transformed and written one at a time; everything is written beside OUT and renamed
into place at the end, so a failure leaves nothing at OUT.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Dict, Optional

import torch

from ..config import ConfigError, RunConfig, dump_config, padded_vocab_size, resolve_config
from ..languages import load_registry
from ..model.upcycle import fresh_routers
from ..training.manifest import checksum_files, files_of_rank, write_manifest
from .errors import ConvertError
from .hf_config import QWEN2, TABLE_BY_EXPERTS, parse_config, read_config
from .hf_io import HFTensors
from .mcore_io import LazyTensor, write_tensors
from .names import Arch, entries, hf_shapes, to_mcore
from .progress import Progress

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja")


def converted_config(hf_dir: str, upcycle_last_n: Optional[int], language_table: Optional[str],
                     layout: Dict[str, int]) -> RunConfig:
    """Our config for the model in hf_dir, validated for the target layout."""
    source = parse_config(read_config(hf_dir), hf_dir)
    cfg = RunConfig()
    cfg.training.train_steps = 0  # weights, not a run: no data needed
    cfg.model = dataclasses.replace(cfg.model, **source.model)
    if source.model_type == QWEN2:
        cfg.moe = dataclasses.replace(cfg.moe, moe_last_n=upcycle_last_n or 0)
        cfg.data.language_table = language_table or "families"
    else:
        if upcycle_last_n:
            raise ConvertError(f"{hf_dir} is already a MoE model ({source.model_type}): --upcycle-last-n is for "
                               "dense Qwen2 models")
        cfg.moe = dataclasses.replace(cfg.moe, **source.moe)
        table = language_table or TABLE_BY_EXPERTS.get(source.num_experts)
        if table is None or load_registry(table).num_experts != source.num_experts:
            raise ConvertError(f"{hf_dir} has {source.num_experts} experts; the language table "
                               f"{table or 'families'} has {load_registry(table or 'families').num_experts}: "
                               "pass --language-table with one expert per expert of the model")
        cfg.data.language_table = table
    if cfg.moe.moe_last_n > cfg.model.num_layers:
        raise ConvertError(f"--upcycle-last-n {cfg.moe.moe_last_n} is more than the model's "
                           f"{cfg.model.num_layers} layers")
    check = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **layout))
    try:
        resolve_config(check, check_files=False)
    except ConfigError as e:
        raise ConvertError(f"the model cannot be split into tensor {layout['tensor']}, pipeline "
                           f"{layout['pipeline']}, expert {layout['expert']}: {e}") from e
    return cfg


def arch_of(cfg: RunConfig) -> Arch:
    m = cfg.model
    experts = load_registry(cfg.data.language_table).num_experts if cfg.moe.moe_last_n else 0
    return Arch(num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_attention_heads,
                num_groups=m.num_query_groups, vocab_size=m.vocab_size,
                padded_vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by),
                moe_layers=tuple(range(m.num_layers - cfg.moe.moe_last_n, m.num_layers)), num_experts=experts,
                tied=m.tie_embeddings, shared_ffn=(cfg.moe.shared_expert_ffn_hidden_size or 0) if experts else 0)


def _sources(hf: HFTensors, cfg: RunConfig, arch: Arch, upcycled: bool, seed: int) -> Dict[str, LazyTensor]:
    """For every megatron-core tensor: its shape and dtype now, how to make it later."""
    ffn = cfg.model.ffn_hidden_size
    expert_ffn = cfg.moe.expert_ffn_hidden_size or ffn
    dense_arch = dataclasses.replace(arch, moe_layers=()) if upcycled else arch
    expected = hf_shapes(dense_arch, ffn, expert_ffn)
    for name, shape in expected.items():
        if name not in hf:
            raise ConvertError(f"{hf.directory}: tensor {name!r} is missing")
        if hf.shape(name) != shape:
            raise ConvertError(f"{hf.directory}: tensor {name!r} has shape {hf.shape(name)}, expected {shape} "
                               "from config.json")
    unexpected = sorted(k for k in hf.keys() if k not in expected and not _ignorable(k, hf, arch.tied))
    if unexpected:
        raise ConvertError(f"{hf.directory}: {len(unexpected)} tensor(s) have no place in the model config.json "
                           f"describes, e.g. {unexpected[0]!r} {hf.shape(unexpected[0])}")
    dtype = hf["model.norm.weight"].dtype  # the checkpoint's own (bfloat16 for released models)
    routers = fresh_routers(arch.moe_layers, arch.num_experts, arch.hidden_size, seed) if upcycled else {}
    dense_names = {e.mcore: e.hf for e in entries(dense_arch)}
    out = {}
    for entry in entries(arch):
        if upcycled and entry.kind.startswith("experts"):  # every expert copies the layer's dense MLP
            layer = entry.mcore.split(".")[2]
            dense_key = f"decoder.layers.{layer}.mlp.linear_fc{1 if entry.kind == 'experts_gate_up' else 2}.weight"
            names = dense_names[dense_key] * arch.num_experts
        elif upcycled and entry.mcore.endswith("router.weight"):
            weight = routers[int(entry.mcore.split(".")[2])].to(dtype)
            out[entry.mcore] = LazyTensor(tuple(weight.shape), dtype, lambda w=weight: w)
            continue
        else:
            names = entry.hf
        shape = tuple(to_mcore(entry, [torch.empty(expected.get(n) or hf.shape(n), device="meta") for n in names],
                               arch).shape)
        out[entry.mcore] = LazyTensor(shape, dtype, lambda e=entry, n=names: to_mcore(e, [hf[x].to(dtype) for x in n],
                                                                                        arch))
    return out


def _ignorable(name: str, hf: HFTensors, tied: bool) -> bool:
    """Tensors that carry nothing: Qwen2-MoE's shared expert of size 0 (and its gate, which multiplies zero),
    and an output layer stored beside the embedding it is tied to."""
    if ".mlp.shared_expert." in name:
        return 0 in hf.shape(name)
    if name.endswith(".mlp.shared_expert_gate.weight"):
        layer = name[:-len("_gate.weight")]
        return 0 in hf.shape(f"{layer}.down_proj.weight") if f"{layer}.down_proj.weight" in hf else False
    return tied and name == "lm_head.weight"


def hf_to_mcore(hf_dir: str, out_dir: str, upcycle_last_n: Optional[int] = None, language_table: Optional[str] = None,
                seed: int = 1234, layout: Optional[Dict[str, int]] = None, quiet: bool = False) -> str:
    layout = {"tensor": 1, "pipeline": 1, "expert": 1, **(layout or {})}
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConvertError(f"{out_dir} already exists and is not empty: choose a new directory")
    cfg = converted_config(hf_dir, upcycle_last_n, language_table, layout)
    arch = arch_of(cfg)
    hf = HFTensors(hf_dir)
    upcycled = bool(upcycle_last_n)
    sources = _sources(hf, cfg, arch, upcycled, seed)
    partial = f"{out_dir.rstrip('/')}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    iteration = os.path.join(partial, "iter_0000000")
    os.makedirs(iteration)
    try:
        with Progress(len(sources), "writing", quiet) as progress:
            write_tensors(iteration, sources, on_tensor=progress.advance)
        torch.save({"train_state": {"iteration": 0, "consumed_rows": 0, "skipped_steps": 0, "layout": {}},
                    "converted_from": os.path.abspath(hf_dir)}, os.path.join(iteration, "common.pt"))
        dump_config(cfg, os.path.join(iteration, "run_config.yaml"))
        # last, as training saves do: loads verify a checkpoint against it
        write_manifest(iteration, checksum_files(iteration, files_of_rank(iteration, 0)))
        tokenizer = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, f))]
        if tokenizer:
            os.makedirs(os.path.join(partial, "tokenizer"))
            for name in tokenizer:
                shutil.copy2(os.path.join(hf_dir, name), os.path.join(partial, "tokenizer", name))
        with open(os.path.join(partial, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("0\n")
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir
