"""A progress line per conversion (tensors done / all, the current tensor group), on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, verb: str, quiet: bool = False):
        self.total, self.verb, self.quiet = total, verb, quiet
        self.done = 0
        self.started = time.monotonic()
        self.last = 0.0

    def __enter__(self):
        return self

    def advance(self, key: str) -> None:
        self.done += 1
        now = time.monotonic()
        if self.quiet or (now - self.last < 0.5 and self.done < self.total):
            return
        self.last = now
        group = ".".join(key.split(".")[:3]) if key.startswith("decoder.layers.") else key.split(".")[0]
        sys.stderr.write(f"\r{self.verb} {self.done}/{self.total} tensors ({group}) {now - self.started:.0f}s   ")
        sys.stderr.flush()

    def __exit__(self, *exc):
        if not self.quiet and self.done:
            sys.stderr.write("\n")
        return False
