"""One micro-batch through the model: megatron-core's forward_step_func and its loss function.

The loss is summed over tokens (megatron-core divides by the global token count, see
`calculate_per_token_loss`), and summed per family id for the metrics.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Iterator

import torch

from ..data.batches import MicroBatch


def masked_token_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, family_ids: torch.Tensor,
                      num_families: int):
    """megatron-core loss_func contract: (loss to backpropagate, token count, values to report).

    Reports "lm loss" = [sum, tokens] and "family loss" = [[sum per family], [tokens per family]].
    """
    losses = per_token_loss.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    masked = losses * mask
    loss_sum = masked.sum()
    tokens = mask.sum()
    ids = family_ids.reshape(-1).to(losses.device)
    family_sum = torch.zeros(num_families, dtype=torch.float32, device=losses.device).index_add_(0, ids, masked.detach())
    family_tokens = torch.zeros(num_families, dtype=torch.float32, device=losses.device).index_add_(0, ids, mask)
    report = {"lm loss": torch.stack([loss_sum.detach(), tokens]),
              "family loss": torch.stack([family_sum, family_tokens])}
    return loss_sum, tokens.to(torch.int), report


def make_forward_step(num_families: int) -> Callable:
    def forward_step(data_iterator: Iterator[MicroBatch], model):
        batch = next(data_iterator)  # every pipeline stage reads the micro-batch: family ids are needed everywhere
        device = next(model.parameters()).device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                       family_ids=batch["family_ids"])
        return output, partial(masked_token_loss, loss_mask=batch["loss_mask"], family_ids=batch["family_ids"],
                               num_families=num_families)

    return forward_step


def sum_reports(reports) -> Dict[str, torch.Tensor]:
    """Add up the per-micro-batch reports of one step (on a last pipeline stage)."""
    out: Dict[str, torch.Tensor] = {}
    for report in reports:
        for key, value in report.items():
            out[key] = out[key] + value if key in out else value.clone()
    return out
