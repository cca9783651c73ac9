"""Checkpoints that prove they are whole: CHECKPOINT/manifest.json lists every file with its size and checksum.

Each rank checksums the files it wrote right after writing them (dist_checkpointing names them
`__RANK_N.distcp`; rank 0 also takes the rest), while they are still in the page cache; rank 0 writes the
manifest last, before the checkpoint is renamed into place. A checkpoint is complete only when its manifest
verifies: every listed file present, of its size and checksum. Training, conversion, analysis and
evaluation verify before they load, and no checkpoint that fails is ever used without saying so.
No megatron-core or torch here: the launcher checks completeness before starting any worker.
"""
from __future__ import annotations

import json
import mmap
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import xxhash

from .checkpoint_paths import LATEST, CheckpointError, find_checkpoint, iteration_dir, saved_iterations

MANIFEST = "manifest.json"
ALGORITHM = "xxh3_128"
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")
_CHUNK = 1 << 30  # hashed a gigabyte at a time: a mapping of a whole 20 GB shard is fine, its page tables less so


def checksum(path: str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for start in range(0, size, _CHUNK):
            length = min(_CHUNK, size - start)
            with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=start) as view:
                h.update(view)
    return h.hexdigest()


def _entry(path: str) -> dict:
    return {"size": os.path.getsize(path), ALGORITHM: checksum(path)}


def files_of_rank(directory: str, rank: int) -> List[str]:
    """The files of a checkpoint being written that `rank` checksums: its own shards; rank 0 also the rest."""
    names = []
    for name in sorted(os.listdir(directory)):
        if name == MANIFEST or not os.path.isfile(os.path.join(directory, name)):
            continue
        m = _RANK_FILE.match(name)
        if (int(m.group(1)) if m else 0) == rank:
            names.append(name)
    return names


def checksum_files(directory: str, names: Iterable[str]) -> Dict[str, dict]:
    return {name: _entry(os.path.join(directory, name)) for name in names}


def write_manifest(directory: str, entries: Dict[str, dict]) -> None:
    """Written aside, flushed and renamed: a manifest is whole or absent."""
    path = os.path.join(directory, MANIFEST)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": 1, "algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: str) -> Dict[str, dict]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} has no {MANIFEST}: it is not a complete checkpoint (a save that did not "
                              "finish, or a directory medmoe did not write)")
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
        files = data["files"]
        if data.get("algorithm") != ALGORITHM or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get(ALGORITHM), str)
                for e in files.values()):
            raise ValueError(f"expected {ALGORITHM} entries with sizes")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}): the checkpoint cannot be verified")
    return files


def file_problem(directory: str, name: str, expected: dict, checksums: bool = True) -> Optional[str]:
    path = os.path.join(directory, name)
    try:
        size = os.path.getsize(path)
    except OSError:
        return f"{path} is missing"
    if size != expected["size"]:
        return f"{path} is {size:,} bytes, its manifest says {expected['size']:,} (truncated or overwritten)"
    if checksums and checksum(path) != expected[ALGORITHM]:
        return f"{path} does not match its checksum in {MANIFEST} (the file is damaged)"
    return None


def checkpoint_problem(directory: str, share: Tuple[int, int] = (0, 1), checksums: bool = True) -> Optional[str]:
    """What is wrong with a checkpoint, or None when it verifies. `share` = (index, count): check every
    count-th file from index on (ranks verify a checkpoint together); sizes are always checked for all."""
    try:
        files = read_manifest(directory)
    except CheckpointError as e:
        return str(e)
    index, count = share
    for i, (name, expected) in enumerate(sorted(files.items())):
        problem = file_problem(directory, name, expected, checksums=checksums and i % count == index)
        if problem:
            return problem
    return None


def damaged_message(problem: str) -> str:
    return (f"{problem}. Nothing was loaded. To continue from the newest checkpoint that verifies instead, set "
            "checkpoint.fallback=true (medmoe train --ckpt-fallback)")


def verified_checkpoint(load_dir: str) -> str:
    """The checkpoint `load_dir` names (itself, or a save directory's latest), verified; else CheckpointError."""
    path = find_checkpoint(load_dir)
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(damaged_message(problem))
    return path


def fallback_candidates(save_dir: str) -> Sequence[str]:
    """A save directory's checkpoints, newest first: where checkpoint.fallback looks."""
    return [iteration_dir(save_dir, i) for i in sorted(saved_iterations(save_dir), reverse=True)]


__all__ = ["ALGORITHM", "LATEST", "MANIFEST", "checkpoint_problem", "checksum_files", "damaged_message",
           "fallback_candidates", "files_of_rank", "read_manifest", "verified_checkpoint", "write_manifest"]
