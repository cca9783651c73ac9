"""The only place megatron-core (0.16.1) is redirected, so that it runs on a CPU-only torch with gloo.

megatron-core assumes CUDA in a handful of places. Each redirect below names the megatron-core code it
stands in for. They are applied only when no GPU is present (`apply_if_cpu`; the one for a missing
TransformerEngine, te_general_gemm_symbol, on GPUs too), and tests/test_cpu_compat.py
checks each one still has a target and is still needed, so a megatron-core upgrade that breaks or obsoletes
one fails loudly. Nothing here changes arithmetic.
"""
from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.distributed as dist

MEGATRON_CORE_VERSION = "0.16.1"


class _NoOpEvent:
    """Stands in for torch.cuda.Event: on CPU every operation is already complete."""

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


class _NoOpStream:
    """Stands in for torch.cuda.Stream: CPU work runs in program order on one stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpEvent()

    def synchronize(self):
        pass


_DEFAULT_STREAM = _NoOpStream()


@dataclass(frozen=True)
class Redirect:
    name: str
    stands_in_for: str
    apply: Callable[[], None]
    targets: Tuple[str, ...]  # "module:attribute" the redirect replaces (checked to exist before applying)


def missing_targets(redirect: Redirect) -> List[str]:
    missing = []
    for target in redirect.targets:
        module_name, _, attribute = target.partition(":")
        module = importlib.import_module(module_name)
        if attribute and not hasattr(module, attribute):
            missing.append(target)
    return missing


def _device_queries():
    # megatron-core uses torch.cuda.current_device() as "the device" everywhere it allocates
    # (e.g. transformer/moe/router.py, tensor_parallel/layers.py); on CPU that device is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # synchronize() before timers and collectives; CPU work is already synchronous.
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _rng_states():
    # tensor_parallel/random.py keeps per-TP/EP "CUDA" RNG states in its tracker and swaps them with
    # torch.cuda.get_rng_state/_set_cuda_rng_state; on CPU the generator to swap is the CPU one.
    import megatron.core.tensor_parallel.random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


def _streams_and_events():
    # transformer/moe/token_dispatcher.py (alltoall) copies split sizes to the host on a side stream
    # and waits on events; on CPU there is one stream and nothing to wait for.
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = lambda *args, **kwargs: _NoOpEvent()
    torch.cuda.current_stream = lambda *args, **kwargs: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def _tensor_cuda_method():
    # models/common/language_module/language_module.py moves the tied embedding to the GPU with
    # weight.data.cuda() before all-reducing it between the first and last pipeline stages; on CPU the
    # tensor is already where it belongs.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _te_general_gemm_symbol():
    # transformer/moe/moe_utils.py binds te_general_gemm only inside its TransformerEngine import,
    # yet later code tests `te_general_gemm is None`: without TE the name is unbound.
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _host_split_sizes():
    # token_dispatcher.maybe_move_tensor_to_cpu converts only CUDA tensors to numpy, so on CPU the
    # alltoall split sizes stay tensors and torch.distributed.all_to_all_single rejects them.
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _uneven_gather_scatter():
    # tensor_parallel/mappings.py _gather_along_first_dim / _reduce_scatter_along_first_dim take
    # uneven split sizes (alltoall dispatcher with TP>1 and EP>1); gloo has no uneven all-gather or
    # reduce-scatter, so pad-and-gather and all-reduce-then-slice give the same result.
    import megatron.core.tensor_parallel.mappings as mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in range(group.size())]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, output_split_sizes)], dim=0)

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        summed = input_.clone()
        dist.all_reduce(summed, group=group)
        return torch.split(summed, list(input_split_sizes), dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = reduce_scatter_along_first_dim


def _schedule_device_literal():
    # pipeline_parallel/schedules.py allocates its token counter with a literal
    # torch.zeros([], dtype=torch.int, device="cuda"); give that module a torch whose zeros() maps
    # "cuda" to the CPU (every other attribute is the real torch).
    import megatron.core.pipeline_parallel.schedules as schedules

    class _TorchWithCpuZeros(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    shim = _TorchWithCpuZeros("torch")

    def zeros(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)

    shim.zeros = zeros
    schedules.torch = shim


REDIRECTS: List[Redirect] = [
    Redirect("device_queries", "torch.cuda.current_device / synchronize", _device_queries,
             ("torch.cuda:current_device", "torch.cuda:synchronize")),
    Redirect("rng_states", "tensor_parallel.random CUDA RNG state get/set", _rng_states,
             ("megatron.core.tensor_parallel.random:_get_cuda_rng_state",
              "megatron.core.tensor_parallel.random:_set_cuda_rng_state")),
    Redirect("streams_and_events", "torch.cuda.Stream / Event / current_stream / stream", _streams_and_events,
             ("torch.cuda:Stream", "torch.cuda:Event", "torch.cuda:current_stream", "torch.cuda:stream")),
    Redirect("tensor_cuda_method", "Tensor.cuda() of the tied embedding across pipeline stages", _tensor_cuda_method,
             ("torch:Tensor", "megatron.core.models.common.language_module.language_module:LanguageModule")),
    Redirect("te_general_gemm_symbol", "moe_utils.te_general_gemm unbound without TransformerEngine",
             _te_general_gemm_symbol, ("megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction",)),
    Redirect("host_split_sizes", "token_dispatcher.maybe_move_tensor_to_cpu", _host_split_sizes,
             ("megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu",)),
    Redirect("uneven_gather_scatter", "tensor_parallel.mappings uneven all-gather / reduce-scatter",
             _uneven_gather_scatter, ("megatron.core.tensor_parallel.mappings:_gather_along_first_dim",
                                      "megatron.core.tensor_parallel.mappings:_reduce_scatter_along_first_dim")),
    Redirect("schedule_device_literal", 'pipeline_parallel.schedules torch.zeros(device="cuda")',
             _schedule_device_literal, ("megatron.core.pipeline_parallel.schedules:torch",)),
]

_applied = False


def gpu_present() -> bool:
    return torch.cuda.is_available()


def apply_if_cpu() -> bool:
    """Apply every redirect once, when no GPU is present. Returns whether the CPU mode is active."""
    global _applied
    if gpu_present():
        # not a CPU matter: on a GPU without TransformerEngine megatron-core's MoE router needs the name too
        _te_general_gemm_symbol()
        return False
    if not _applied:
        import megatron.core

        version = megatron.core.__version__
        if version != MEGATRON_CORE_VERSION:
            raise RuntimeError(
                f"megatron-core {version} is installed, but the CPU redirects in {__name__} were written and "
                f"tested for {MEGATRON_CORE_VERSION}: install megatron-core=={MEGATRON_CORE_VERSION}")
        for redirect in REDIRECTS:
            missing = missing_targets(redirect)
            if missing:
                raise RuntimeError(f"CPU redirect {redirect.name!r} ({redirect.stands_in_for}): {missing} no longer "
                                   f"exist in megatron-core {version}; revisit {__name__}")
        for redirect in REDIRECTS:
            redirect.apply()
        _applied = True
    return True


def import_megatron_core_deferring_compile() -> None:
    """Import megatron-core with its import-time `torch.compile` calls deferred to the first call.

    Not a redirect (nothing changes what runs): megatron/core/jit.py makes `jit_fuser = torch.compile`, and
    decorating its ~40 fused functions at import loads TorchInductor, about 2 s of every CPU process's start,
    although with bias/activation fusion off none of them runs on CPU. Here each decorated function compiles
    on its first call instead, exactly as `torch.compile` would have compiled it then. GPU processes import
    megatron-core unchanged."""
    import sys

    if gpu_present() or "megatron.core" in sys.modules:
        return
    real_compile = torch.compile
    torch.compile = _deferred_compile(real_compile)
    try:
        import megatron.core  # noqa: F401
        import megatron.core.models.gpt  # noqa: F401
    finally:
        torch.compile = real_compile


def _deferred_compile(real_compile):
    """A `torch.compile` stand-in whose decorated functions call `real_compile` on their first call."""
    import functools

    def deferred(model=None, **options):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: deferred(fn, **options)
        compiled = []

        @functools.wraps(model)
        def first_call_compiles(*args, **kwargs):
            if not compiled:
                compiled.append(real_compile(model, **options))
            return compiled[0](*args, **kwargs)

        first_call_compiles.deferred_compile = True
        return first_call_compiles

    return deferred
