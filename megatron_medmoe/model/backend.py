"""Which layer implementation a run uses: TransformerEngine's (GPU) or megatron-core's local one.

TransformerEngine is imported lazily and only here: it needs a GPU and its CUDA libraries to import at all.
"""
from __future__ import annotations

import functools


class BackendError(RuntimeError):
    """The requested layer implementation cannot run on this machine."""


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def use_transformer_engine(impl: str) -> bool:
    """model.transformer_impl -> whether to build TransformerEngine layers (auto: when they import)."""
    if impl == "local":
        return False
    import torch

    available = transformer_engine_available()
    if impl == "transformer_engine" and not available:
        reason = "no GPU is present" if not torch.cuda.is_available() else "import transformer_engine.pytorch failed"
        raise BackendError(f"model.transformer_impl=transformer_engine, but TransformerEngine cannot be used here "
                           f"({reason}); use model.transformer_impl=local or auto")
    return available
