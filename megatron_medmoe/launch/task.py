"""What each task of a submitted job runs: `medmoe train` in-process, as one rank (Slurm) or as the parent of
local workers (submitit's local executor).

Stopping does not rely on submitit's checkpoint hook (task 0 only, exits at once): every rank handles
SIGUSR1/SIGTERM itself (training/signals.py), all ranks save at the same step and return EXIT_REQUEUE; then
rank 0 requeues the job and every task leaves without a result, so submitit sees the job still running.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from ..runtime.exit_codes import EXIT_OK, EXIT_REQUEUE


class TrainingFailed(RuntimeError):
    """`medmoe train` ended with an error code (its output says why)."""


@dataclass
class TrainTask:
    recipe: str  # absolute path
    workdir: str  # relative paths in the recipe are relative to this
    stages: Optional[List[str]] = None  # None: every stage of the recipe, in order
    overrides: List[str] = field(default_factory=list)
    max_requeues: int = 10

    def __call__(self) -> int:
        os.chdir(self.workdir)
        from ..training.run import run_train

        code = EXIT_OK
        for stage in self.stages or [None]:
            code = run_train(self.recipe, self.overrides, stage)
            if code != EXIT_OK:
                break
        sys.stdout.flush()
        sys.stderr.flush()
        if code == EXIT_OK:
            return code
        job = os.environ.get("SLURM_JOB_ID")
        if code == EXIT_REQUEUE and job and "SLURM_STEP_ID" in os.environ:
            restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
            if restarts >= self.max_requeues:
                raise TrainingFailed(f"stopped to resume later, but job {job} was requeued {restarts} times already "
                                     f"(--max-requeues {self.max_requeues}); submit again to go on")
            if os.environ.get("SLURM_PROCID") == "0":
                print(f"medmoe: saved and stopped; requeueing job {job} (restart {restarts + 1} of at most "
                      f"{self.max_requeues})", flush=True)
                subprocess.run(["scontrol", "requeue", job], check=True)
            os._exit(EXIT_REQUEUE)  # no result file: the job is not over
        if code == EXIT_REQUEUE:
            raise TrainingFailed("stopped by a signal after saving; submit again to resume")
        raise TrainingFailed(f"medmoe train exited {code}")
