"""RMSNorm for megatron-core's local (non-TransformerEngine) layer spec.

megatron-core's WrappedTorchNorm refuses sequence parallelism, which MoE with tensor parallelism needs.
This norm computes in float32 and casts back before the scale, as Qwen2's RMSNorm does. Its weight is
replicated across tensor-parallel ranks while its input is split along the sequence, so it is tagged
`sequence_parallel` for megatron-core to all-reduce its gradient over the tensor-parallel group.
"""
import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
