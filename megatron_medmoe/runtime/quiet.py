"""Silence megatron-core warnings that only say optional GPU libraries are absent (every CPU run would
print them once per rank); every other warning still shows."""
import warnings

KNOWN_NOISE = (
    r"Transformer Engine and Apex are not installed",  # megatron-core falls back to torch implementations
    r"Apex is not installed",  # ... and to torch norms (we use our own RMSNorm on the local spec)
    r"full scope is deprecated",  # raised by megatron-core's own TransformerConfig default
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",  # megatron-core's call into torch
    r"`torch\.jit\.script_method` is deprecated",  # megatron-core's jit fusions, imported on CPU too
)


def silence_known_noise() -> None:
    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
