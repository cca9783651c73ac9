"""Which layer implementation a run uses: TransformerEngine's (GPU) or megatron-core's local one, and
whether this machine can run what the config asks for (FP8, grouped GEMM).

TransformerEngine is imported lazily and only here: it needs a GPU and its CUDA libraries to import at all.
"""
from __future__ import annotations

import functools
from typing import Tuple


class BackendError(RuntimeError):
    """The requested layer implementation cannot run on this machine."""


@functools.lru_cache(maxsize=None)
def _transformer_engine_problem() -> str:
    """'' when TransformerEngine's PyTorch layers import on a GPU, else why not."""
    import torch

    if not torch.cuda.is_available():
        return "no GPU is present"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:
        return f"import transformer_engine.pytorch failed: {e}"
    return ""


def use_transformer_engine(impl: str) -> bool:
    """model.transformer_impl -> whether to build TransformerEngine layers (auto: when they import)."""
    if impl == "local":
        return False
    problem = _transformer_engine_problem()
    if impl == "transformer_engine" and problem:
        raise BackendError(f"model.transformer_impl=transformer_engine, but TransformerEngine cannot be used here "
                           f"({problem}); use model.transformer_impl=local or auto")
    return not problem


@functools.lru_cache(maxsize=None)
def planned_layers(impl: str) -> Tuple[str, str]:
    """(the layers `medmoe plan` plans for, why): what model.transformer_impl builds on a GPU of this machine;
    on a machine without a GPU (a login node), auto is planned as TransformerEngine's, as NVIDIA's PyTorch
    image runs it. The attention memory depends on it: without TransformerEngine attention is unfused and keeps
    the s x s scores."""
    if impl != "auto":
        return impl, f"model.transformer_impl={impl}"
    import torch

    if not torch.cuda.is_available():
        return "transformer_engine", ("model.transformer_impl=auto planned as TransformerEngine layers (fused "
                                      "attention; no GPU here to ask): set model.transformer_impl=local to plan for "
                                      "GPUs without TransformerEngine")
    if use_transformer_engine(impl):
        return "transformer_engine", "model.transformer_impl=auto: TransformerEngine layers on this machine"
    return "local", (f"model.transformer_impl=auto: local layers on this machine ({_transformer_engine_problem()}), "
                     "so unfused attention")


# FP8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x); block scaling from Hopper on
FP8_MIN_CAPABILITY = (8, 9)
BLOCKWISE_MIN_CAPABILITY = (9, 0)


def fp8_device_problem(recipe: str, device_name: str, capability: Tuple[int, int]) -> str:
    """Why this GPU cannot run the FP8 recipe ('' when it can)."""
    cc = f"{capability[0]}.{capability[1]}"
    if tuple(capability) < FP8_MIN_CAPABILITY:
        return (f"{device_name} (compute capability {cc}) has no FP8 tensor cores: FP8 needs compute capability "
                "8.9 or newer (L40S, H100, H200, B200); train in bf16 by removing fp8.format")
    if recipe == "blockwise" and tuple(capability) < BLOCKWISE_MIN_CAPABILITY:
        return (f"fp8.recipe=blockwise needs compute capability 9.0 or newer (Hopper); {device_name} has {cc}: "
                "use fp8.recipe=tensorwise or delayed")
    return ""


# the TransformerEngine releases megatron-core 0.16.1 builds each FP8 recipe from (fp8_utils.get_fp8_recipe: older
# ones pass TE's own checks and fail at the first forward)
TE_MIN_VERSION_FOR_RECIPE = {"delayed": "2.1.0", "tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0"}
# what megatron-core 0.16.1 is tested with (its dev extra), and the gpu extra of setup.py installs
TE_SUPPORTED = ("2.9", "2.12")


def te_version_problem(recipe: str, te_version: str) -> str:
    """Why this TransformerEngine release cannot run the FP8 recipe ('' when it can)."""
    from packaging.version import Version

    needed = TE_MIN_VERSION_FOR_RECIPE[recipe]
    if Version(te_version) < Version(needed):
        return (f"fp8.recipe={recipe} needs TransformerEngine {needed.split('.dev')[0]} or newer, this machine has "
                f"{te_version}; install transformer-engine[pytorch]>={TE_SUPPORTED[0]},<{TE_SUPPORTED[1]} (what "
                "megatron-core 0.16.1 supports) or use NVIDIA's PyTorch image")
    return ""


def _transformer_engine_fp8_problem(recipe: str) -> str:
    """TransformerEngine's own verdict on FP8 (it also knows its build and CUDA version), where it says one."""
    checks = ["check_fp8_support"] + (["check_fp8_block_scaling_support"] if recipe == "blockwise" else [])
    for module_name in ("transformer_engine.pytorch.fp8", "transformer_engine.pytorch.quantization"):
        try:
            module = __import__(module_name, fromlist=checks)
        except ImportError:
            continue
        for name in checks:
            check = getattr(module, name, None)
            if check is not None:
                ok, reason = check()
                if not ok:
                    return f"TransformerEngine reports: {reason}"
        return ""
    return ""


# fusions.* -> (megatron-core's TransformerConfig field, whether it needs TransformerEngine layers)
FUSIONS = {"bias_activation": ("bias_activation_fusion", False), "rope": ("apply_rope_fusion", True),
           "masked_softmax": ("masked_softmax_fusion", False),
           "gradient_accumulation": ("gradient_accumulation_fusion", True),
           "moe_permute": ("moe_permute_fusion", True), "cross_entropy": ("cross_entropy_loss_fusion", False)}


def fusion_settings(fusions, on_gpu: bool, use_te: bool) -> Tuple[dict, list]:
    """(megatron-core's fusion fields, the problems of fusions required where they cannot run). Fused kernels
    need a GPU; rope, gradient accumulation and MoE permutation also TransformerEngine layers."""
    settings, problems = {}, []
    for name, (field, needs_te) in FUSIONS.items():
        asked = getattr(fusions, name)
        possible = on_gpu and (use_te or not needs_te)
        if asked and not possible:
            why = "no GPU is present" if not on_gpu else "the layers are not TransformerEngine's"
            problems.append(f"fusions.{name}=true, but {why}: set it to null (on where it can run) or false")
        settings[field] = bool(possible if asked is None else asked and possible)
    return settings, problems


def check_machine(cfg) -> None:
    """Raise BackendError when this machine cannot run the resolved config's FP8 / grouped GEMM settings."""
    impl = cfg.model.transformer_impl
    if cfg.fp8.format is not None:
        if not use_transformer_engine(impl):
            raise BackendError(f"fp8.format={cfg.fp8.format} needs TransformerEngine layers, which cannot be used "
                               f"here ({_transformer_engine_problem()}); remove fp8.format to train in bf16")
        import torch

        import transformer_engine

        problem = (fp8_device_problem(cfg.fp8.recipe, torch.cuda.get_device_name(),
                                      torch.cuda.get_device_capability())
                   or te_version_problem(cfg.fp8.recipe, transformer_engine.__version__)
                   or _transformer_engine_fp8_problem(cfg.fp8.recipe))
        if problem:
            raise BackendError(f"fp8.format={cfg.fp8.format}: {problem}")
    if any(getattr(cfg.fusions, name) for name in FUSIONS):  # required fusions: can this machine run them?
        import torch

        on_gpu = torch.cuda.is_available()
        problems = fusion_settings(cfg.fusions, on_gpu, on_gpu and use_transformer_engine(impl))[1]
        if problems:
            raise BackendError("; ".join(problems))
    if cfg.moe.moe_last_n > 0 and cfg.moe.grouped_gemm and not use_transformer_engine(impl):
        raise BackendError(f"moe.grouped_gemm=true needs TransformerEngine layers, which cannot be used here "
                           f"({_transformer_engine_problem()}); set moe.grouped_gemm=null or false")
