"""`medmoe convert verify`: our model and transformers' own, on the same tokens, in float32.

Our side: the checkpoint's model built in this process (one rank; dist_checkpointing gathers whatever
layout saved it), in eval mode, so MoE routing is plain top-k as at inference. Their side:
AutoModelForCausalLM on the Hugging Face directory (an ApolloMoE directory, whose modeling code is never
run, through transformers' Qwen2-MoE with the same weights). Reported per next-token distribution: the KL
divergence (theirs || ours), the largest absolute logit difference and the share of positions whose
argmax agrees. Passing means KL below 1e-6 everywhere and 100% argmax agreement.

A hard-routed checkpoint (moe.routing hard) sends each token to its family's expert with weight 1, which
no Hugging Face config can say: both sides get the same random family id per token, and transformers'
routers are overridden to choose that expert with weight 1 (its experts compute as transformers computes
them). That checks every tensor the model uses; its router weights are unused by hard routing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..languages import load_registry
from ..training.checkpoint_paths import CheckpointError
from .errors import ConvertError
from .hf_config import APOLLO_MOE, read_config

KL_LIMIT = 1e-6


@dataclass
class Agreement:
    max_kl: float
    mean_kl: float
    max_abs_logit_diff: float
    argmax_agreement: float
    positions: int
    note: str = ""  # how the comparison was made, where it differs from plain logits on random tokens

    @property
    def passed(self) -> bool:
        return self.max_kl < KL_LIMIT and self.argmax_agreement == 1.0

    def describe(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: KL max {self.max_kl:.3e} (mean {self.mean_kl:.3e}, limit {KL_LIMIT:g}), max |logit "
                f"difference| {self.max_abs_logit_diff:.3e}, argmax agreement {self.argmax_agreement:.2%} over "
                f"{self.positions} positions" + (f" ({self.note})" if self.note else ""))


def compare_logits(theirs: torch.Tensor, ours: torch.Tensor) -> Agreement:
    theirs, ours = theirs.double().reshape(-1, theirs.shape[-1]), ours.double().reshape(-1, ours.shape[-1])
    log_p, log_q = torch.log_softmax(theirs, -1), torch.log_softmax(ours, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)
    return Agreement(float(kl.max()), float(kl.mean()), float((theirs - ours).abs().max()),
                     float((theirs.argmax(-1) == ours.argmax(-1)).double().mean()), theirs.shape[0])


def hf_model(hf_dir: str):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = read_config(hf_dir)
    if config.get("model_type") == APOLLO_MOE:  # same tensors as Qwen2-MoE, no shared expert
        fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map",
                                                                 "language_gate", "share_flag")}
        fields["shared_expert_intermediate_size"] = 0
        model = Qwen2MoeForCausalLM.from_pretrained(hf_dir, config=Qwen2MoeConfig(**fields), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return model.eval()


def _one_rank():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from ..runtime import cpu_compat
    from ..runtime.launch import free_port

    if dist.is_initialized():
        return False
    cpu_compat.apply_if_cpu()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    return True


def our_model(ckpt: str):
    from ..inference.loaded import ModelLoadError, inference_config
    from ..model.gpt import build_model_chunks
    from ..training.checkpoint import load_checkpoint
    from .mcore_to_hf import open_checkpoint

    path, cfg = open_checkpoint(ckpt, checksums=False)  # load_checkpoint verifies the checksums
    try:
        cfg = inference_config(cfg, 1, local=True)  # fp32, local layers: compared with transformers on the CPU
    except ModelLoadError as e:
        raise ConvertError(str(e)) from e
    (model,) = build_model_chunks(cfg, load_registry(cfg.data.language_table).num_experts)
    try:
        load_checkpoint(path, [model], cfg)
    except CheckpointError as e:
        raise ConvertError(str(e)) from e
    return model.float().eval(), cfg


def hard_family_ids(cfg, batch_size: int, seq_length: int, seed: int) -> Optional[torch.Tensor]:
    """For a hard-routed checkpoint, a random family id per token (every expert gets tokens); else None."""
    if not cfg.moe.moe_last_n or cfg.moe.routing != "hard":
        return None
    experts = load_registry(cfg.data.language_table).num_experts
    return torch.randint(0, experts, (batch_size, seq_length), generator=torch.Generator().manual_seed(seed + 1))


def route_to_family(theirs, family_ids: torch.Tensor):
    """Hooks making every MoE layer of transformers' model send each token to its family expert, weight 1."""
    chosen = family_ids.reshape(-1, 1)

    def hook(module, args, output):
        if not (isinstance(output, tuple) and len(output) == 3):
            raise ConvertError("verifying a hard-routed checkpoint needs a transformers whose Qwen2-MoE router "
                               "returns the chosen experts (transformers 5)")
        logits, weights, _ = output
        return logits, torch.ones_like(weights[:, :1]), chosen.to(weights.device)

    return [layer.mlp.gate.register_forward_hook(hook) for layer in theirs.model.layers if hasattr(layer.mlp, "gate")]


def _compare(theirs, ours, vocab: int, batch_size: int, seq_length: int, seed: int,
             family_ids: Optional[torch.Tensor] = None) -> Agreement:
    from ..data.batches import causal_mask

    if theirs.config.vocab_size != vocab:
        raise ConvertError(f"the Hugging Face model has a vocabulary of {theirs.config.vocab_size}, the checkpoint "
                           f"{vocab}")
    tokens = torch.randint(0, vocab, (batch_size, seq_length), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(seq_length).unsqueeze(0).expand(batch_size, -1)
    with torch.no_grad():
        reference = theirs(input_ids=tokens).logits
        logits = ours(tokens, positions, causal_mask(seq_length), family_ids=family_ids)[..., :vocab]
    return compare_logits(reference, logits)


HARD_NOTE = ("hard routing: each token sent to a random family expert with weight 1 on both sides; transformers on "
             "its own routes by its router instead")


def verify(hf_dir: str, ckpt: str, batch_size: int = 2, seq_length: int = 64, seed: int = 0) -> Agreement:
    started = _one_rank()
    hooks = []
    try:
        ours, cfg = our_model(ckpt)
        theirs = hf_model(hf_dir)
        family_ids = hard_family_ids(cfg, batch_size, seq_length, seed)
        if family_ids is not None:
            hooks = route_to_family(theirs, family_ids)
        agreement = _compare(theirs, ours, cfg.model.vocab_size, batch_size, seq_length, seed, family_ids)
        if hooks:
            agreement.note = HARD_NOTE
        return agreement
    finally:
        for h in hooks:
            h.remove()
        if started:
            from ..runtime.distributed import shutdown_distributed

            shutdown_distributed()


def verify_upcycled(hf_dir: str, ckpt: str, batch_size: int = 2, seq_length: int = 64, seed: int = 0) -> Agreement:
    """An upcycled checkpoint against its dense source, as the spec predicts: with identical experts, a MoE
    layer gives (p_a + p_b) x the dense MLP for the top-k experts a, b of its router (weights not
    renormalised). transformers' dense model runs with each of those layers' MLP output scaled so. Hard
    routing weighs its one expert by 1: the MoE layers are then the dense MLP itself."""
    from .mcore_io import CheckpointTensors
    from .mcore_to_hf import open_checkpoint

    path, cfg = open_checkpoint(ckpt)
    tensors = CheckpointTensors(path)
    first_moe = cfg.model.num_layers - cfg.moe.moe_last_n
    routers = {i: tensors[f"decoder.layers.{i}.mlp.router.weight"].double() for i in range(first_moe, cfg.model.num_layers)}
    model = hf_model(hf_dir)
    topk = cfg.moe.topk

    def scale(weight):
        def hook(module, args, output):
            probs = torch.softmax(args[0].double() @ weight.t(), dim=-1)
            return output * probs.topk(topk, dim=-1).values.sum(-1, keepdim=True).to(output.dtype)
        return hook

    family_ids = hard_family_ids(cfg, batch_size, seq_length, seed)
    hooks = [] if family_ids is not None else [model.model.layers[i].mlp.register_forward_hook(scale(w))
                                               for i, w in routers.items()]
    started = _one_rank()
    try:
        ours, _ = our_model(ckpt)
        return _compare(model, ours, cfg.model.vocab_size, batch_size, seq_length, seed, family_ids)
    finally:
        for h in hooks:
            h.remove()
        if started:
            from ..runtime.distributed import shutdown_distributed

            shutdown_distributed()
