"""The Post-MoE language-family model on megatron-core: router, MoE layer, specs, construction."""
