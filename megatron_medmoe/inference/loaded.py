"""One of our checkpoints (saved under any layout) as a model in this rank, in eval mode.

The checkpoint's run_config.yaml gives the shape; the layout is ours to choose: tensor parallelism only
(pipeline, expert and data parallel sizes 1), loaded by megatron-core's dist_checkpointing, which reads
whatever each rank needs from any saved layout. Every rank sees the whole sequence (no sequence
parallelism at inference), and logits are gathered over the tensor-parallel ranks, so callers see a plain
[batch, seq, vocab] model whatever the layout. MoE routing is plain top-k (eval mode), as at inference.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ConfigError, FP8Config, RunConfig, resolve_config
from ..languages import LanguageRegistry, load_registry
from ..runtime.env import DistEnv


class ModelLoadError(ValueError):
    """A checkpoint that cannot be run for inference (missing, broken, or not ours)."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # PostMoEGPTModel, eval mode
    cfg: RunConfig  # as built here (tensor-parallel layout, fp32)
    registry: LanguageRegistry
    path: str  # the checkpoint directory

    @property
    def vocab_size(self) -> int:
        return self.cfg.model.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, family_ids: Optional[torch.Tensor] = None, positions=None,
               inference_context=None) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab] (float32, the tokenizer's vocabulary, gathered over TP)."""
        from ..data.batches import causal_mask

        tokens = tokens.to(self.device)
        b, s = tokens.shape
        if positions is None:
            start = inference_context.sequence_len_offset if inference_context is not None else 0
            positions = torch.arange(start, start + s, device=self.device).unsqueeze(0).expand(b, -1)
        if family_ids is not None:
            family_ids = family_ids.to(self.device)
        mask = None if inference_context is not None and s == 1 else causal_mask(s).to(self.device)
        out = self.model(tokens, positions, mask, family_ids=family_ids, inference_context=inference_context,
                         runtime_gather_output=True)
        return out[..., :self.vocab_size].float()


def inference_config(cfg: RunConfig, tensor: int, local: bool = False) -> RunConfig:
    """The checkpoint's config with the inference layout: TP `tensor`, nothing else parallel, fp32 (no FP8, no
    grouped GEMM), the local layer spec on CPU or when asked (`local`)."""
    cfg.parallel = dataclasses.replace(cfg.parallel, tensor=tensor, pipeline=1, virtual_pipeline=None, expert=1,
                                       expert_tensor=None, data=1, sequence_parallel=None)
    # experts one by one (SequentialMLP): the neuron hooks of the analysis tools read each expert's fc1
    cfg.moe = dataclasses.replace(cfg.moe, expert_slots=None, expert_placement=None, grouped_gemm=False)
    cfg.training = dataclasses.replace(cfg.training, precision="fp32", recompute_granularity=None)
    cfg.fp8 = FP8Config()
    if local or not torch.cuda.is_available():
        cfg.model = dataclasses.replace(cfg.model, transformer_impl="local")
    try:
        cfg = resolve_config(cfg, world_size=tensor, check_files=False)
    except ConfigError as e:
        raise ModelLoadError(f"the model cannot run with --tensor-parallel {tensor}:\n{e}") from e
    cfg.parallel.sequence_parallel = False  # every rank sees the whole sequence (decoding steps are 1 token)
    return cfg


def open_model_config(ckpt: str):
    """(checkpoint directory, its run config) of a checkpoint or a save directory's latest."""
    from ..convert.errors import ConvertError
    from ..convert.mcore_to_hf import open_checkpoint

    try:
        return open_checkpoint(ckpt, checksums=False)  # load_model's load verifies the checksums, ranks together
    except ConvertError as e:
        raise ModelLoadError(str(e)) from e


def load_model(ckpt: str, tensor: int, env: DistEnv) -> LoadedModel:
    """Join the job (`tensor` ranks), build the model and load the checkpoint's weights into it."""
    from ..model.gpt import build_model_chunks
    from ..runtime.distributed import initialize_distributed
    from ..training.checkpoint import CheckpointError, load_checkpoint

    path, cfg = open_model_config(ckpt)
    cfg = inference_config(cfg, tensor)
    registry = load_registry(cfg.data.language_table)
    initialize_distributed(cfg, env)
    (model,) = build_model_chunks(cfg, registry.num_experts)
    try:
        load_checkpoint(path, [model], cfg)
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from e
    return LoadedModel(model.float().eval(), cfg, registry, path)


def model_tokenizer(loaded: LoadedModel, explicit: Optional[str] = None):
    """The tokenizer of a loaded checkpoint: --tokenizer, else the one beside its save directory (conversions
    copy it there), else the one its datasets were preprocessed with. Raises TokenizerError."""
    from ..convert.mcore_to_hf import find_tokenizer
    from ..data.tokenizer import TokenizerError, load_fast_tokenizer

    found = find_tokenizer(os.path.dirname(loaded.path), loaded.cfg, explicit)
    if found is None:
        raise TokenizerError(f"no tokenizer found for {loaded.path}: pass --tokenizer DIR")
    return load_fast_tokenizer(found)
