"""megatron-core torch_dist checkpoints, one tensor at a time.

A converted checkpoint is layout-free: every tensor whole, under the key megatron-core's sharded state dict
gives it (`decoder.layers.3.mlp.experts.experts.linear_fc1.weight`, experts stacked on a leading axis), as
a one-process model would save it. Loading it under any TP/PP/EP is dist_checkpointing's job: each rank
reads the chunks it needs. torch_dist is PyTorch's distributed checkpoint format, so writing goes through
it with a planner that produces each tensor only when the writer reaches it, and reading asks for one key
at a time: memory holds one tensor, not the model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from .errors import ConvertError


@dataclass
class LazyTensor:
    """A tensor described now and produced when written."""
    shape: Tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


class _ProduceOnWrite(DefaultSavePlanner):
    """Plans with shape-only (meta) tensors; the writer's request for one makes it."""

    def __init__(self, tensors: Dict[str, LazyTensor], on_tensor: Callable[[str], None]):
        super().__init__()
        self.tensors = tensors
        self.on_tensor = on_tensor
        self.error: Optional[ConvertError] = None  # torch wraps what the writer raises: kept to raise as itself

    def lookup_object(self, index):
        lazy = self.tensors[index.fqn]
        try:
            tensor = lazy.produce()
            if tuple(tensor.shape) != tuple(lazy.shape) or tensor.dtype != lazy.dtype:
                raise ConvertError(f"{index.fqn}: produced {tuple(tensor.shape)} {tensor.dtype}, planned "
                                   f"{tuple(lazy.shape)} {lazy.dtype}")
        except ConvertError as e:
            self.error = e
            raise
        self.on_tensor(index.fqn)
        return tensor.contiguous()


def write_tensors(directory: str, tensors: Dict[str, LazyTensor], on_tensor: Callable[[str], None] = lambda k: None):
    """Write the model tensors of a torch_dist checkpoint into `directory` (which must exist)."""
    planned = {key: torch.empty(lazy.shape, dtype=lazy.dtype, device="meta") for key, lazy in tensors.items()}
    planner = _ProduceOnWrite(tensors, on_tensor)
    try:
        # one file per tensor: torch's writer keeps every tensor of a file alive until the file is complete
        dcp.save(planned, storage_writer=FileSystemWriter(directory, single_file_per_rank=False, thread_count=1),
                 planner=planner, no_dist=True)
    except Exception:
        if planner.error is not None:
            raise planner.error from None
        raise
    # what megatron-core's dist_checkpointing.core.save_config writes (without importing megatron-core here)
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}, f)


class CheckpointTensors:
    """The whole tensors of a torch_dist checkpoint (any layout it was saved with), read one by one."""

    def __init__(self, path: str):
        self.path = path
        try:
            metadata = FileSystemReader(path).read_metadata()
        except Exception as e:  # a missing or damaged .metadata file
            raise ConvertError(f"cannot read the checkpoint metadata in {path}: {type(e).__name__}: {e}") from e
        self.meta = {key: (tuple(m.size), m.properties.dtype) for key, m in metadata.state_dict_metadata.items()
                     if isinstance(m, TensorStorageMetadata)}

    def keys(self):
        return self.meta.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.meta

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.meta[key][0]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.meta:
            raise ConvertError(f"{self.path} has no tensor {key!r}")
        shape, dtype = self.meta[key]
        out = {key: torch.empty(shape, dtype=dtype)}
        try:
            dcp.load(out, storage_reader=FileSystemReader(self.path), no_dist=True)
        except Exception as e:
            raise ConvertError(f"cannot read {key} from {self.path}: {type(e).__name__}: {e}") from e
        return out[key]

