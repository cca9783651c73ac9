"""An MoE layer whose router also receives each token's family id.

megatron-core threads one per-token tensor explicitly from GPTModel.forward down to every MoE layer:
the `padding_mask` argument. It is split for sequence parallelism with the hidden states, passed to
each layer by the transformer block, and captured as an argument by every activation-recomputation
path (full-layer checkpointing, selective `mlp` and `moe` recomputation). Post-MoE models send the
family ids [batch, seq] on that channel (see gpt.py), so a recomputed forward always sees the ids of
its own micro-batch, never a global's. This layer hands them to the router before dispatch.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer


class _FamilyMoELayerIsKnown(logging.Filter):
    """megatron-core's TransformerLayer recognises MoE layers by identity (`module in (MoELayer, ...)`) to
    pass them its process groups, and warns "Unknown MLP type" for a subclass. FamilyMoELayer then takes
    megatron-core's default process groups, which are the same ones, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_FamilyMoELayerIsKnown())


class FamilyMoELayer(MoELayer):
    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None,
                padding_mask: Optional[torch.Tensor] = None):
        """hidden_states [s, b, h]; padding_mask carries the family ids [b, s] (see module docstring)."""
        if intermediate_tensors is not None:
            raise NotImplementedError("partial CUDA-graph capture of MoE layers is not supported by FamilyMoELayer")
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("MoE layers with tensor parallelism need sequence parallelism in training")
        family_ids = None if padding_mask is None else padding_mask.transpose(0, 1)

        def route_and_compute(hidden_states, family_ids):
            shared_expert_output = self.shared_experts_compute(hidden_states)
            probs, routing_map = self.router(hidden_states, family_ids)
            hidden_states, probs = self.preprocess(hidden_states, probs, routing_map)
            dispatched_input, probs = self.dispatch(hidden_states, probs)
            output, mlp_bias = self.routed_experts_compute(dispatched_input, probs)
            output = self.combine(output)
            return self.postprocess(output, shared_expert_output), mlp_bias

        if not self.moe_layer_recompute:
            return route_and_compute(hidden_states, family_ids)
        if self.config.fp8 or self.config.fp4:
            from megatron.core.extensions.transformer_engine import te_checkpoint

            return te_checkpoint(route_and_compute, False, tensor_parallel.random.get_cuda_rng_tracker,
                                 parallel_state.get_tensor_model_parallel_group(), hidden_states, family_ids)
        return tensor_parallel.checkpoint(route_and_compute, False, hidden_states, family_ids)
