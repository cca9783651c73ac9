"""Where metrics go besides the console and metrics.jsonl: TensorBoard and Weights & Biases (rank 0).

Weights & Biases runs offline (files under OUTPUT_DIR/wandb, `wandb sync` later) unless WANDB_API_KEY is
set in the environment (or WANDB_MODE says otherwise); the key is only ever read from there by wandb itself,
never printed, logged or saved by us.
"""
from __future__ import annotations

import os
from typing import Dict, List

from ..config import RunConfig


def _scalars(record: dict) -> Dict[str, float]:
    out = {key: value for key, value in record.items() if isinstance(value, (int, float)) and key != "step"}
    for family, loss in record.get("family_loss", {}).items():
        out[f"family_loss/{family}"] = loss
    for layer, entry in record.get("moe_layers", {}).items():
        out[f"moe/layer{layer}/imbalance"] = entry["imbalance"]
        if "family_in_own_topk" in entry:
            out[f"moe/layer{layer}/family_in_own_topk"] = entry["family_in_own_topk"]
        for expert, share in enumerate(entry["expert_share"]):
            out[f"moe/layer{layer}/expert{expert}_share"] = share
    return out


class TensorBoardWriter:
    def __init__(self, cfg: RunConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(cfg.logging.output_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    def __init__(self, cfg: RunConfig, run_config: dict):
        import wandb

        # WANDB_MODE, when set, decides (offline, disabled, ...); else online only with a key
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=cfg.logging.wandb_project, dir=cfg.logging.output_dir, mode=mode,
                              config=run_config, name=os.path.basename(os.path.normpath(cfg.logging.output_dir)),
                              reinit="finish_previous")

    def write(self, record: dict) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_writers(cfg: RunConfig, run_config: dict) -> List[object]:
    writers: List[object] = []
    if cfg.logging.tensorboard:
        writers.append(TensorBoardWriter(cfg))
    if cfg.logging.wandb:
        os.makedirs(cfg.logging.output_dir, exist_ok=True)
        writers.append(WandbWriter(cfg, run_config))
    return writers
