"""megatron-medmoe: Post-MoE language-family expert models on megatron-core."""
__version__ = "0.1.0"
