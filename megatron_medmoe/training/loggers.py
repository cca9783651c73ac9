"""Where metrics go besides the console and metrics.jsonl: TensorBoard and Weights & Biases (rank 0).

Weights & Biases runs offline (files under OUTPUT_DIR/wandb, `wandb sync` later) unless WANDB_API_KEY is
set in the environment (or WANDB_MODE says otherwise); the key is only ever read from there by wandb itself,
never printed, logged or saved by us.

A run resumed from step S supersedes what the crashed run logged after S: TensorBoard discards those events
(purge_step). A Weights & Biases run cannot be rewound offline (W&B's rewind is an online preview feature),
so the resumed run is a new one in the same group (the output directory's name), named for its first step
(NAME-from-step-S+1) and with `resumed_at: S` in its config; the earlier run keeps its steps after S.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from ..config import RunConfig


def _scalars(record: dict) -> Dict[str, float]:
    out = {key: value for key, value in record.items() if isinstance(value, (int, float)) and key != "step"}
    for family, loss in record.get("family_loss", {}).items():
        out[f"family_loss/{family}"] = loss
    validation = record.get("validation", {})
    for key in ("loss", "ppl"):
        if key in validation:
            out[f"validation/{key}"] = validation[key]
    for family, loss in validation.get("family_loss", {}).items():
        out[f"validation/family_loss/{family}"] = loss
    dev = record.get("mcq_dev", {})
    for key in ("accuracy", "major_average", "minor_average"):
        if dev.get(key) is not None:
            out[f"mcq_dev/{key}"] = dev[key]
    for code, accuracy in dev.get("per_language", {}).items():
        out[f"mcq_dev/language/{code}"] = accuracy
    for layer, entry in record.get("moe_layers", {}).items():
        out[f"moe/layer{layer}/imbalance"] = entry["imbalance"]
        if "family_in_own_topk" in entry:
            out[f"moe/layer{layer}/family_in_own_topk"] = entry["family_in_own_topk"]
        for expert, share in enumerate(entry["expert_share"]):
            out[f"moe/layer{layer}/expert{expert}_share"] = share
    return out


class TensorBoardWriter:
    def __init__(self, cfg: RunConfig, resumed_at: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides every earlier event at a step >= purge_step: the crashed run's steps after S
        purge_step = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(os.path.join(cfg.logging.output_dir, "tensorboard"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    def __init__(self, cfg: RunConfig, run_config: dict, resumed_at: Optional[int] = None):
        import wandb

        # WANDB_MODE, when set, decides (offline, disabled, ...); else online only with a key
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        name = os.path.basename(os.path.normpath(cfg.logging.output_dir))
        if resumed_at is not None:
            run_config = {**run_config, "resumed_at": resumed_at}
        self.run = wandb.init(project=cfg.logging.wandb_project, dir=cfg.logging.output_dir, mode=mode,
                              config=run_config, group=name,
                              name=name if resumed_at is None else f"{name}-from-step-{resumed_at + 1}",
                              reinit="finish_previous")

    def write(self, record: dict) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_writers(cfg: RunConfig, run_config: dict, resumed_at: Optional[int] = None) -> List[object]:
    """resumed_at: the step a resumed run starts after (None: a new run)."""
    writers: List[object] = []
    if cfg.logging.tensorboard:
        writers.append(TensorBoardWriter(cfg, resumed_at))
    if cfg.logging.wandb:
        os.makedirs(cfg.logging.output_dir, exist_ok=True)
        writers.append(WandbWriter(cfg, run_config, resumed_at))
    return writers
