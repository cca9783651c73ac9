"""The only place megatron-core (0.16.1) is redirected: so that it runs on a CPU-only torch with gloo, its GPU
code path included (runtime/device.py), and around three of its bugs on every machine.

megatron-core assumes CUDA in a handful of places. Each redirect below names the megatron-core code it
stands in for. They are applied only when no GPU is present (`apply_if_cpu`), but for those of ON_GPUS_TOO,
and tests/test_cpu_compat.py checks each one still has a target and is still needed, so a megatron-core upgrade
that breaks or obsoletes one fails loudly. The CPU redirects change no arithmetic (gloo's missing collectives
are emulated exactly, sums order aside); those of ON_GPUS_TOO restore the optimizer state megatron-core meant to
save and load.
"""
from __future__ import annotations

import contextlib
import functools
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


class _TorchWithCpuForCuda(types.ModuleType):
    """The real torch, except that its tensor factories put a literal device="cuda" on the CPU: given as `torch`
    to a megatron-core module that allocates with that literal (every other attribute is the real torch's)."""

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_for_cuda(factory):
    def on_cpu(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return factory(*args, device=device, **kwargs)

    return on_cpu


def _torch_with_cpu_for_cuda() -> types.ModuleType:
    shim = _TorchWithCpuForCuda("torch")
    for name in ("zeros", "tensor", "empty", "ones"):
        setattr(shim, name, _cpu_for_cuda(getattr(torch, name)))
    return shim


def _schedule_device_literal():
    # pipeline_parallel/schedules.py allocates its token counter with a literal
    # torch.zeros([], dtype=torch.int, device="cuda")
    import megatron.core.pipeline_parallel.schedules as schedules

    schedules.torch = _torch_with_cpu_for_cuda()


def _optimizer_device_literals():
    # the GPU path's optimizer allocates with a literal device="cuda": optimizer/optimizer.py
    # (MixedPrecisionOptimizer's unit loss scale), optimizer/clip_grads.py (the norm's and the clipping's
    # buffers) and utils.local_multi_tensor_l2_norm (the norm, without TransformerEngine or apex)
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    import megatron.core.utils as utils

    for module in (optimizer, clip_grads, utils):
        module.torch = _torch_with_cpu_for_cuda()


_real_tensor_type = torch.Tensor.type


def _type_under_cuda_name(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _real_tensor_type(self).replace("torch.", "torch.cuda.", 1)
    return _real_tensor_type(self, dtype, non_blocking, **kwargs)


def _reporting_cuda_type_names(fn):
    """`fn` during whose calls a CPU tensor's type() names the CUDA type of its dtype (type(dtype) converts as
    ever; the real method is back when the call returns)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = torch.Tensor.type
        torch.Tensor.type = _type_under_cuda_name
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = before

    return wrapper


def _cuda_type_names():
    # the GPU path's optimizer tells bf16 from fp32 parameters by their type() name, accepting only
    # 'torch.cuda.BFloat16Tensor' / 'torch.cuda.FloatTensor' and raising TypeError otherwise
    # (DistributedOptimizer.__init__, also through _build_model_and_main_param_groups) or asserting it
    # (clip_grads.clip_grad_by_total_norm_fp32, which optimizer/optimizer.py imported by name)
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    DistributedOptimizer.__init__ = _reporting_cuda_type_names(DistributedOptimizer.__init__)
    clip = _reporting_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = optimizer.clip_grad_by_total_norm_fp32 = clip


def _torch_adam_steps():
    # without TransformerEngine and apex (distrib_optimizer.HAVE_APEX_OR_TE false) the distributed optimizer keeps
    # torch's Adam, whose step is per-parameter state, and optimizer/distrib_optimizer.py mishandles it:
    # - state_dict() asserts that the state holds one step value, so sharded_state_dict(is_loading=True) fails on
    #   an optimizer that has not stepped yet (every resume);
    # - load_state_dict() gives all parameters one shared step tensor, to which torch's Adam then adds 1 per
    #   parameter;
    # - _set_main_param_and_optimizer_states() then copies every state key from the loaded param_state: for
    #   dp_reshardable the step the live state had when the sharded state dict was made (0), for
    #   fully_reshardable none at all (KeyError).
    # So the state is allocated before a load (step 0, by load_state_dict, which allocates it given the param
    # groups alone), the param_state's step is passed over, and after a load every parameter has a step tensor of
    # its own holding the checkpoint's step (from its param groups). Not a CPU matter: GPUs without
    # TransformerEngine and apex run this code too.
    from megatron.core.optimizer import distrib_optimizer

    optimizer_class = distrib_optimizer.DistributedOptimizer
    if distrib_optimizer.HAVE_APEX_OR_TE:  # their Adam keeps the step per param group
        return
    sharded_state_dict, load_state_dict = optimizer_class.sharded_state_dict, optimizer_class.load_state_dict
    set_states = optimizer_class._set_main_param_and_optimizer_states

    @functools.wraps(sharded_state_dict)
    def sharded_state_dict_with_state(self, model_sharded_state_dict={}, is_loading=False, sharding_type=None,
                                      metadata=None):
        if is_loading and not self.optimizer.state and not self.ddp_config.use_megatron_fsdp:
            groups = [{**{k: v for k, v in g.items() if k != "params"}, "step": 0} for g in self.optimizer.param_groups]
            self.load_state_dict({"optimizer": {"param_groups": groups}})
        return sharded_state_dict(self, model_sharded_state_dict, is_loading, sharding_type, metadata)

    @functools.wraps(set_states)
    def set_states_but_the_step(self, model_param, tensors):
        live = self._get_main_param_and_optimizer_states(model_param)
        if "step" in live:
            tensors = {**tensors, "step": live["step"]}
        set_states(self, model_param, tensors)

    @functools.wraps(load_state_dict)
    def load_state_dict_with_own_steps(self, state_dict):
        load_state_dict(self, state_dict)
        steps = {g["step"] for g in state_dict.get("optimizer", {}).get("param_groups", []) if "step" in g}
        if len(steps) == 1 and not self.ddp_config.use_megatron_fsdp:
            step = steps.pop()
            for state in self.optimizer.state.values():
                state["step"] = torch.tensor(step, dtype=torch.float)  # the dtype megatron-core's load gives it

    optimizer_class.sharded_state_dict = sharded_state_dict_with_state
    optimizer_class._set_main_param_and_optimizer_states = set_states_but_the_step
    optimizer_class.load_state_dict = load_state_dict_with_own_steps


def _fully_reshardable_bucket_offsets():
    # optimizer/distrib_optimizer.py sharded_param_state_fully_reshardable slices the world tensors of
    # get_parameter_state_dp_zero, which join the buckets with each bucket's end padding left out, at
    # param_index_map offsets, which count that padding: with more than one bucket (parallel.overlap_grad_reduce)
    # every parameter after the first bucket was saved from the wrong place, its tail zeros (megatron-core warns
    # "param range exceeds unpadded buffer"), and a resume trained on garbage. Megatron-LM fixed it after 0.16.1
    # (NVIDIA/Megatron-LM#5077). Here, for that call only, the world tensors hold each bucket at its offset in
    # the buffer, where those offsets point. Not a CPU matter: every machine saves this way.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.sharded_param_state_fully_reshardable

    @functools.wraps(original)
    def sharded_param_state_fully_reshardable(self, model_sharded_state_dict, is_loading=False, metadata=None):
        gather = self.get_parameter_state_dp_zero

        def at_buffer_offsets(*args, **kwargs):
            state = gather(*args, **kwargs)
            for gbuf_idx, dtype_state in (state or {}).items():
                if not isinstance(gbuf_idx, int):  # "buckets_coalesced"
                    continue
                buffer = self.buffers[gbuf_idx]
                for world in dtype_state.values():
                    for key, joined in world.items():
                        if torch.is_tensor(joined) and joined.numel() == buffer.numel_unpadded:
                            world[key] = _at_bucket_offsets(joined, buffer)
            return state

        self.get_parameter_state_dp_zero = at_buffer_offsets
        try:
            return original(self, model_sharded_state_dict, is_loading, metadata)
        finally:
            del self.get_parameter_state_dp_zero

    DistributedOptimizer.sharded_param_state_fully_reshardable = sharded_param_state_fully_reshardable


def _at_bucket_offsets(joined: torch.Tensor, buffer) -> torch.Tensor:
    """A buffer's buckets, joined without their end padding, laid out at their offsets in the buffer."""
    laid_out = joined.new_zeros(buffer.numel)
    start = 0
    for bucket in buffer.buckets:
        laid_out[bucket.offset:bucket.offset + bucket.numel_unpadded] = joined[start:start + bucket.numel_unpadded]
        start += bucket.numel_unpadded
    return laid_out


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
    Redirect("optimizer_device_literals", 'optimizer, clip_grads and utils.local_multi_tensor_l2_norm device="cuda"',
             _optimizer_device_literals, ("megatron.core.optimizer.optimizer:torch",
                                          "megatron.core.optimizer.clip_grads:torch", "megatron.core.utils:torch")),
    Redirect("cuda_type_names", "DistributedOptimizer / clip_grad_by_total_norm_fp32 type() == 'torch.cuda.*'",
             _cuda_type_names, ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
                                "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
                                "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32")),
    Redirect("torch_adam_steps", "DistributedOptimizer state_dict / load_state_dict of torch Adam's step",
             _torch_adam_steps, ("megatron.core.optimizer.distrib_optimizer:HAVE_APEX_OR_TE",
                                 "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer")),
    Redirect("fully_reshardable_bucket_offsets",
             "DistributedOptimizer.sharded_param_state_fully_reshardable offsets past the first bucket",
             _fully_reshardable_bucket_offsets,
             ("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
              "megatron.core.distributed.param_and_grad_buffer:_ParamAndGradBucket")),
]

_applied = False


def gpu_present() -> bool:
    return torch.cuda.is_available()


# megatron-core bugs rather than CPU matters, redirected on GPUs too: the MoE router's symbol without
# TransformerEngine, torch Adam's step without TransformerEngine and apex, fully_reshardable's bucket offsets
ON_GPUS_TOO = ("te_general_gemm_symbol", "torch_adam_steps", "fully_reshardable_bucket_offsets")


def apply_if_cpu() -> bool:
    """Apply the redirects once: every one when no GPU is present, those of ON_GPUS_TOO when one is. Returns
    whether the CPU mode is active."""
    global _applied
    cpu = not gpu_present()
    if not _applied:
        import megatron.core

        version = megatron.core.__version__
        if version != MEGATRON_CORE_VERSION:
            raise RuntimeError(
                f"megatron-core {version} is installed, but the redirects in {__name__} were written and "
                f"tested for {MEGATRON_CORE_VERSION}: install megatron-core=={MEGATRON_CORE_VERSION}")
        chosen = [r for r in REDIRECTS if cpu or r.name in ON_GPUS_TOO]
        for redirect in chosen:
            missing = missing_targets(redirect)
            if missing:
                raise RuntimeError(f"redirect {redirect.name!r} ({redirect.stands_in_for}): {missing} no longer "
                                   f"exist in megatron-core {version}; revisit {__name__}")
        for redirect in chosen:
            redirect.apply()
        _applied = True
    return cpu


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
