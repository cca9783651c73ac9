"""Which code path a process takes: the GPU one or the CPU one.

The GPU path is bf16 parameters in megatron-core's Float16Module, its mixed-precision distributed optimizer
(DDP with use_distributed_optimizer) and that optimizer's checkpoint formats; the CPU path is fp32 with
torch's AdamW (training/optimizer.py). Every decision between the two asks `gpu_code_path()`, never
`torch.cuda.is_available()`, so that the tests can run the GPU path on a CPU-only machine over gloo
(MEDMOE_GPU_PATH_ON_CPU=1, a test switch, not an option). Where tensors live is a separate question:
the switch moves nothing to a GPU, and device placement keeps asking torch.cuda.
"""
from __future__ import annotations

import os

import torch

GPU_PATH_ON_CPU_ENV = "MEDMOE_GPU_PATH_ON_CPU"


def gpu_code_path() -> bool:
    return torch.cuda.is_available() or os.environ.get(GPU_PATH_ON_CPU_ENV) == "1"
