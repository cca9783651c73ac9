"""Silence megatron-core warnings that only say optional GPU libraries are absent (every CPU run would
print them once per rank); every other warning still shows."""
import warnings

KNOWN_NOISE = (
    r"Transformer Engine and Apex are not installed",  # megatron-core falls back to torch implementations
    r"Apex is not installed",  # ... and to torch norms (we use our own RMSNorm on the local spec)
    r"full scope is deprecated",  # raised by megatron-core's own TransformerConfig default
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",  # megatron-core's call into torch
    r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",  # ... and its distributed optimizer's
    r"`torch\.jit\.script_method` is deprecated",  # megatron-core's jit fusions, imported on CPU too
    r"Please use DTensor instead and we are deprecating ShardedTensor",  # torch_dist checkpoints, inside torch
    r"`load_state_dict` is deprecated and will be removed",  # megatron-core's call into torch's checkpointing
    r"torch\.distributed is disabled, unavailable or uninitialized",  # one-process conversions, by design
    r"Initializing zero-element tensors is a no-op",  # transformers' size-0 shared expert (Qwen2-MoE exports)
)


def silence_known_noise() -> None:
    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
