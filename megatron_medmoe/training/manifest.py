"""Checkpoints that prove they are whole: CHECKPOINT/manifest.json lists every file with its size and checksum.

Each rank checksums the files it writes (dist_checkpointing names them `__RANK_N.distcp`; rank 0 also takes
the rest) while they are being written, from the page cache; rank 0 writes the manifest last, before the
checkpoint is renamed into place. A checkpoint is complete only when its manifest
verifies: every listed file present, of its size and checksum. Training, conversion, analysis and
evaluation verify what they load, and no checkpoint that fails is ever used without saying so.
No megatron-core or torch here: the launcher checks completeness before starting any worker.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import threading
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import xxhash

from .checkpoint_paths import CheckpointError, iteration_dir, saved_iterations

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


class ChecksumWhileWriting:
    """Checksums this rank's shards while dist_checkpointing writes them: its writers append to each file from
    start to end (torch's checkpoint writer never seeks back), so a thread hashes each file's new bytes as it
    grows, on a core the writer processes leave idle, and only the tail is left when the save returns. Were a
    file ever rewritten behind the thread, its checksum would not match and the checkpoint would fail to
    verify: a false alarm, never a damaged checkpoint passing as whole.

        with ChecksumWhileWriting(partial, rank) as hashing:
            dist_checkpointing.save(...)
        entries = hashing.entries()   # after the save, with the rank's other files (rank 0: common.pt, ...)
    """

    _BLOCK = 256 << 20

    def __init__(self, directory: str, rank: int):
        self.directory, self.rank = directory, rank
        self._files: Dict[str, list] = {}  # name -> [fd, bytes hashed, hasher]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="medmoe-checksum", daemon=True)

    def __enter__(self) -> "ChecksumWhileWriting":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is not None:
            self._close()

    def _own_shards(self) -> List[str]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return [n for n in names if (m := _RANK_FILE.match(n)) and int(m.group(1)) == self.rank]

    def _advance(self, name: str, until_end: bool) -> bool:
        if name not in self._files:
            try:
                self._files[name] = [os.open(os.path.join(self.directory, name), os.O_RDONLY), 0, xxhash.xxh3_128()]
            except OSError:
                return False
        fd, done, hasher = entry = self._files[name]
        size = os.fstat(fd).st_size
        moved = False
        while done < size:  # mapped, not read: the page cache is hashed in place, without a copy
            start = done - done % mmap.ALLOCATIONGRANULARITY
            end = min(size, done + self._BLOCK)
            with mmap.mmap(fd, end - start, access=mmap.ACCESS_READ, offset=start) as view, memoryview(view) as mv:
                hasher.update(mv[done - start:])
            entry[1] = done = end
            moved = True
            if not until_end and self._stop.is_set():
                break
        return moved

    def _follow(self) -> None:
        while not self._stop.is_set():
            moved = False
            for name in self._own_shards():
                moved |= self._advance(name, until_end=False)
            if not moved:
                self._stop.wait(0.02)

    def entries(self) -> Dict[str, dict]:
        try:
            for name in self._own_shards():  # the written files are closed now: hash to their end
                self._advance(name, until_end=True)
            out = {name: {"size": size, ALGORITHM: hasher.hexdigest()} for name, (_, size, hasher) in self._files.items()}
        finally:
            self._close()
        rest = [n for n in files_of_rank(self.directory, self.rank) if n not in out]
        return {**out, **checksum_files(self.directory, rest)}

    def _close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()


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


def is_shard(name: str) -> bool:
    """dist_checkpointing's tensor data, nearly all of a checkpoint's bytes (the rest is small: metadata,
    common.pt, run_config.yaml)."""
    return name.endswith(".distcp")


def checkpoint_problem(directory: str, share: Tuple[int, int] = (0, 1), checksums: bool = True,
                       checksum_if: Callable[[str], bool] = lambda name: True,
                       only: Callable[[str], bool] = lambda name: True) -> Optional[str]:
    """What is wrong with a checkpoint, or None when it verifies. `share` = (index, count): checksum every
    count-th file from index on (ranks verify a checkpoint together); `checksum_if` chooses the files to
    checksum and `only` the files to check at all (sizes: every one of those, on every rank)."""
    try:
        files = read_manifest(directory)
    except CheckpointError as e:
        return str(e)
    index, count = share
    for i, (name, expected) in enumerate(sorted(files.items())):
        if not only(name):
            continue
        problem = file_problem(directory, name, expected,
                               checksums=checksums and checksum_if(name) and i % count == index)
        if problem:
            return problem
    return None


class ShardChecksumsMeanwhile:
    """The shards' checksums of this rank's share, in a thread, while the caller loads the checkpoint: the
    loaded state is only used once `problem()` has said the shards are whole (the other files, small, were
    verified before loading)."""

    def __init__(self, directory: str, share: Tuple[int, int]):
        self._problem: Optional[str] = None
        self._thread = threading.Thread(target=self._check, args=(directory, share), name="medmoe-verify",
                                        daemon=True)
        self._thread.start()

    def _check(self, directory: str, share: Tuple[int, int]) -> None:
        try:
            self._problem = checkpoint_problem(directory, share, only=is_shard)
        except OSError as e:  # a file that vanished or cannot be read while we looked
            self._problem = f"{directory}: {e.strerror or e} ({e.filename})"

    def problem(self) -> Optional[str]:
        self._thread.join()
        return self._problem


def damaged_message(problem: str) -> str:
    return (f"{problem}. Nothing was loaded. To continue from the newest checkpoint that verifies instead, set "
            "checkpoint.fallback=true (medmoe train --ckpt-fallback)")


def fallback_candidates(save_dir: str) -> Sequence[str]:
    """A save directory's checkpoints, newest first: where checkpoint.fallback looks."""
    return [iteration_dir(save_dir, i) for i in sorted(saved_iterations(save_dir), reverse=True)]


__all__ = ["ALGORITHM", "MANIFEST", "ChecksumWhileWriting", "ShardChecksumsMeanwhile", "checkpoint_problem",
           "checksum_files", "damaged_message", "fallback_candidates", "files_of_rank", "is_shard", "read_manifest",
           "write_manifest"]
