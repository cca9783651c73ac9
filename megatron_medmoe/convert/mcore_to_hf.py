"""`medmoe convert mcore-to-hf`: any of our checkpoints, whatever layout trained it, to Hugging Face.

Formats: `qwen2` (dense models), `qwen2_moe` (stock transformers Qwen2MoeForCausalLM, loaded without
trust_remote_code; the shared expert it always has is written with size 0, so it adds exactly zero) and
`apollo_moe` (the released ApolloMoE layout and config fields; only what its release code loads as written:
no shared expert, MoE in exactly the last 2 layers, no hard routing). The checkpoint's run_config.yaml says
everything about the model; each tensor is read whole from the torch_dist checkpoint (experts from every
expert-parallel rank, layers from every pipeline stage) one at a time, split into Hugging Face tensors and
written into size-limited safetensors shards, beside OUT, renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from ..config import load_config
from ..training.checkpoint_paths import CheckpointError, find_checkpoint
from ..training.manifest import checkpoint_problem
from .errors import ConvertError
from .hf_config import APOLLO_MOE, FORMATS, QWEN2, QWEN2_MOE, hf_config
from .hf_io import ShardedOut, parse_size
from .hf_to_mcore import TOKENIZER_FILES, arch_of
from .mcore_io import CheckpointTensors
from .names import entries, hf_shapes, to_hf
from .progress import Progress

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def open_checkpoint(ckpt: str, checksums: bool = True):
    """(checkpoint directory, its run config): a checkpoint or a save directory's latest, verified against its
    manifest (sizes only without `checksums`: for callers whose load verifies the checksums itself)."""
    try:
        path = find_checkpoint(ckpt)
        problem = checkpoint_problem(path, checksums=checksums)
    except CheckpointError as e:
        raise ConvertError(str(e)) from e
    if problem:
        raise ConvertError(f"{problem}: convert a checkpoint that verifies (an earlier iter_N of the save directory)")
    run_config = os.path.join(path, "run_config.yaml")
    if not os.path.isfile(run_config):
        raise ConvertError(f"{path} has no run_config.yaml: cannot tell the model's shape")
    return path, load_config(run_config)


def find_tokenizer(ckpt: str, cfg, explicit: Optional[str]) -> Optional[str]:
    """--tokenizer, else the tokenizer a conversion copied beside the checkpoint, else the datasets' tokenizer."""
    if explicit:
        return explicit
    beside = os.path.join(ckpt, "tokenizer")
    if os.path.isdir(beside):
        return beside
    for dataset in cfg.data.datasets:
        try:
            with open(f"{dataset.prefix}.json", encoding="utf-8") as f:
                return json.load(f)["tokenizer"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def _tokenizer_ids(directory: Optional[str]):
    if not directory:
        return None, None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise ConvertError(f"cannot load the tokenizer in {directory}: {e}") from e
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
    return tok.bos_token_id, eos


def mcore_to_hf(ckpt: str, out_dir: str, fmt: str, tokenizer: Optional[str] = None, max_shard_size: str = "5GB",
                dtype: Optional[str] = None, quiet: bool = False) -> str:
    if fmt not in FORMATS:
        raise ConvertError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    model_type = FORMATS[fmt]
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConvertError(f"{out_dir} already exists and is not empty: choose a new directory")
    path, cfg = open_checkpoint(ckpt)
    arch = arch_of(cfg)
    if model_type == QWEN2 and arch.moe_layers:
        raise ConvertError(f"{path} has {len(arch.moe_layers)} MoE layers: --format qwen2 is for dense models; "
                           "use qwen2_moe or apollo_moe")
    if model_type != QWEN2 and not arch.moe_layers:
        raise ConvertError(f"{path} is a dense model (moe.moe_last_n 0): use --format qwen2")
    if model_type == APOLLO_MOE:
        _check_apollo_moe(path, cfg, arch)
    reader = CheckpointTensors(path)
    table = entries(arch)
    missing = [e.mcore for e in table if e.mcore not in reader]
    if missing:
        raise ConvertError(f"{path} lacks {len(missing)} model tensor(s), e.g. {missing[0]!r}; is it a checkpoint "
                           "of this model?")
    out_dtype = DTYPES[dtype] if dtype else reader.meta["decoder.final_layernorm.weight"][1]
    tokenizer_dir = find_tokenizer(ckpt, cfg, tokenizer)
    bos, eos = _tokenizer_ids(tokenizer_dir)

    ffn = cfg.model.ffn_hidden_size
    shapes = hf_shapes(arch, ffn, cfg.moe.expert_ffn_hidden_size or ffn)
    plan = []
    for entry in table:
        plan += [(name, shapes[name], out_dtype) for name in entry.hf]
        if model_type == QWEN2_MOE and not arch.shared_ffn and entry.mcore.endswith("experts.linear_fc2.weight"):
            plan += [(name, tuple(t.shape), out_dtype) for name, t in _absent_shared_expert(entry.hf[0], arch.hidden_size)]

    partial = f"{out_dir.rstrip('/')}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        writer = ShardedOut(partial, plan, parse_size(max_shard_size))
        with Progress(len(table), "exporting", quiet) as progress:
            for entry in table:
                for name, tensor in zip(entry.hf, to_hf(entry, reader[entry.mcore], arch)):
                    writer.write(name, tensor.to(out_dtype))
                if model_type == QWEN2_MOE and not arch.shared_ffn and entry.mcore.endswith("experts.linear_fc2.weight"):
                    for name, tensor in _absent_shared_expert(entry.hf[0], arch.hidden_size):
                        writer.write(name, tensor.to(out_dtype))
                progress.advance(entry.mcore)
        writer.close()
        config = hf_config(cfg, arch.num_experts, model_type, str(out_dtype).replace("torch.", ""), bos, eos)
        with open(os.path.join(partial, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(partial, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, f, indent=2)
        if tokenizer_dir:
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(tokenizer_dir, name)):
                    shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(partial, name))
        elif not quiet:
            print("note: no tokenizer files written (the checkpoint's datasets name none); pass --tokenizer DIR")
        if cfg.moe.routing == "hard" and not quiet:
            print(f"note: {path} routes each token to its family's expert (moe.routing hard), which no Hugging Face "
                  "config can say: the tensors are exact, but transformers routes by the router (top 1, softmax "
                  "weight); medmoe eval runs it as trained")
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


APOLLO_MOE_LAYERS = 2  # the release code makes exactly the last 2 layers MoE, whatever config.json says


def _check_apollo_moe(path: str, cfg, arch) -> None:
    """What the ApolloMoE release code would load wrongly, refused rather than written."""
    if arch.shared_ffn:
        raise ConvertError(f"{path} has a shared expert, which the released ApolloMoE layout cannot hold: use "
                           "--format qwen2_moe")
    if len(arch.moe_layers) != APOLLO_MOE_LAYERS:
        raise ConvertError(f"{path} makes its last {len(arch.moe_layers)} layers MoE (moe.moe_last_n); the ApolloMoE "
                           f"release code builds MoE in exactly the last {APOLLO_MOE_LAYERS} and would load the other "
                           "layers with random weights and only a warning: use --format qwen2_moe")
    if cfg.moe.routing == "hard":
        raise ConvertError(f"{path} routes each token to its family's expert with weight 1 (moe.routing hard); the "
                           "ApolloMoE release code routes by the router and would run it as soft top-1: use "
                           "--format qwen2_moe")


def _absent_shared_expert(expert_name: str, hidden: int):
    """Qwen2-MoE always builds a shared expert: size 0 and a zero gate make it add exactly zero."""
    layer = expert_name.split(".mlp.")[0]
    shapes = {"gate_proj": (0, hidden), "up_proj": (0, hidden), "down_proj": (hidden, 0)}
    out = [(f"{layer}.mlp.shared_expert.{name}.weight", torch.zeros(shape)) for name, shape in shapes.items()]
    return out + [(f"{layer}.mlp.shared_expert_gate.weight", torch.zeros(1, hidden))]
