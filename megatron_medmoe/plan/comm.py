"""Communication volume per training step and GPU: bytes each GPU sends, per kind of parallelism.

Ring collectives over n ranks send (n - 1) / n of the buffer per all-gather or reduce-scatter, twice that per
all-reduce; all-to-all sends the (n - 1) / n of its buffer that belongs to other ranks. With M micro-batches
per step, L_s decoder layers on the GPU's stage, s b tokens per micro-batch, hidden h, k experts per token:
- TP: in units of (t - 1) / t of the s b h activation values of a micro-batch (all-gather and reduce-scatter
  with sequence parallelism, all-reduce, twice the bytes and half as many, without: the same volume):
  attention 2 forward, 2 backward; the dense MLP as many; a MoE layer's experts none here (see EP); full
  recomputation repeats the forward ones; the embedding and the output layer 2 each on their stage.
- PP: each micro-batch's activations forward and their gradient backward, s b h / t values with sequence
  parallelism (s b h without), per model chunk.
- EP: per MoE layer and micro-batch 4 all-to-alls (dispatch and combine, forward and backward; 2 more with full
  recomputation) of the k token copies of the GPU's s b / t tokens; with expert tensor parallelism the
  copies are also gathered and scattered over the expert-tensor group, as many times.
- DP: the distributed optimizer reduce-scatters the fp32 gradients and all-gathers the updated bf16 weights,
  over the data-parallel group (expert weights over the expert-data-parallel group); `dp_grads` is the
  gradients' part (what parallel.overlap_grad_reduce can hide behind the backward pass).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..config import RunConfig
from .memory import is_moe_layer, layers_of_rank, micro_batches_per_step, stage_params


@dataclass(frozen=True)
class StepComm:
    tp: float
    pp: float
    ep: float
    dp: float
    dp_grads: float = 0.0  # of dp: the gradient reduce-scatter

    @property
    def total(self) -> float:
        return self.tp + self.pp + self.ep + self.dp

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def ring(n: int) -> float:
    return (n - 1) / n


def step_comm(cfg: RunConfig, stage: int, num_experts: int, recompute: Optional[str] = None) -> StepComm:
    """Bytes one GPU of pipeline stage `stage` sends in one training step."""
    par, tr, m = cfg.parallel, cfg.training, cfg.model
    t, p, e, et, dp = par.tensor, par.pipeline, par.expert, par.expert_tensor, par.data
    v = par.virtual_pipeline or 1
    n_micro = micro_batches_per_step(cfg)
    act = 2.0 if tr.precision == "bf16" else 4.0  # bytes per activation value
    sbh = cfg.data.seq_length * tr.micro_batch_size * m.hidden_size
    layers = layers_of_rank(cfg, stage)

    moe_layers = sum(is_moe_layer(cfg, layer) for layer in layers)
    dense_layers = len(layers) - moe_layers
    again = recompute == "full"
    tp = 0.0
    if t > 1:
        units = dense_layers * (8 + 4 * again) + moe_layers * (4 + 2 * again) + 2 * (stage == 0) + 2 * (stage == p - 1)
        tp = n_micro * units * ring(t) * sbh * act

    pp = 0.0
    if p > 1:
        sends = 2 if 0 < stage < p - 1 or v > 1 else 1  # forward activations and backward gradients
        pp = n_micro * v * sends * sbh / (t if par.sequence_parallel else 1) * act

    ep = 0.0
    if moe_layers and (e > 1 or et > 1):
        copies = cfg.moe.topk * cfg.data.seq_length * tr.micro_batch_size / (t if par.sequence_parallel else 1)
        per_layer = (4 + 2 * again) * (ring(e) * copies + ring(et) * copies * et) * m.hidden_size * act
        ep = n_micro * moe_layers * per_layer

    params = stage_params(cfg, stage, num_experts)
    expert_dp = t * dp // (e * et)
    grad_bytes, weight_bytes = 4.0, (2.0 if tr.precision == "bf16" else 4.0)
    reduced = ring(dp) * params.dense + ring(expert_dp) * params.experts  # elements each GPU sends
    return StepComm(float(tp), float(pp), float(ep), float(reduced * (grad_bytes + weight_bytes)),
                    float(reduced * grad_bytes))
