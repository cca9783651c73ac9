"""What the tools know of the GPU models they plan for and report against (NVIDIA's figures, SXM parts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense
    nvlink_gbps: float  # NCCL bus bandwidth per GPU inside a node
    capability: Tuple[int, int]  # CUDA compute capability (FP8 from 8.9)


GPUS = {
    "h100": GpuSpec("NVIDIA H100 SXM", 80, 989.0, 360.0, (9, 0)),
    "h200": GpuSpec("NVIDIA H200 SXM", 141, 989.0, 360.0, (9, 0)),
    "a100": GpuSpec("NVIDIA A100 SXM 80GB", 80, 312.0, 230.0, (8, 0)),
    "l40s": GpuSpec("NVIDIA L40S", 48, 362.0, 25.0, (8, 9)),  # no NVLink: PCIe
}


def gpu_of(device_name: str) -> Optional[GpuSpec]:
    """The known model in a CUDA device name ('NVIDIA H100 80GB HBM3' -> h100), else None."""
    name = device_name.upper()
    return next((spec for key, spec in GPUS.items() if key.upper() in name), None)
