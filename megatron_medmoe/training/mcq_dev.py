"""Multiple-choice dev-set accuracy during training (data.mcq_dev, training.mcq_eval_interval; off by default).

The release evaluated a dev split every tenth of an epoch, generating answers. Here each question is scored as
`medmoe eval mcq --mode loglik` scores it (our prompt, training.mcq_shots shots of the same source, seeded):
one row per answer letter, the prompt followed by that letter's continuation, and the letter whose
continuation the model finds most likely is the answer. The rows go through the training layout's own
schedule, forward-only (training/validation.py: eval mode, nothing of training touched), so every layout
evaluates and nothing is gathered onto one rank. A prompt longer than data.seq_length keeps its end (the
question and the last shots), as lm-evaluation-harness truncates, and the record counts the questions so cut.
Accuracy per language and the major / minor averages come from evaluation/scoring.py, as `medmoe eval` reports.
"""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Dict, List, Tuple

import numpy as np
import torch
from megatron.core import parallel_state

from ..config import RunConfig
from ..data.batches import causal_mask, rows_of_batch
from ..data.tokenizer import TokenizerError
from ..languages import LanguageRegistry
from .validation import evaluating, forward_only, sum_over_job


def _row_losses(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """megatron-core loss_func contract; reports each row's summed loss over its continuation tokens."""
    rows = (per_token_loss.float().reshape(loss_mask.shape) * loss_mask).sum(dim=-1)
    return rows.sum(), loss_mask.sum().to(torch.int), {"row loss": rows.detach()}


def scoring_step(data_iterator, model):
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"],
                   family_ids=batch["family_ids"])
    return output, partial(_row_losses, loss_mask=batch["loss_mask"])


class McqDevSet:
    """The dev questions as scoring rows: (question, letter) pairs in order, padded to whole global batches."""

    def __init__(self, cfg: RunConfig, registry: LanguageRegistry, tokenizer):
        from ..evaluation.prompts import build_loglik_prompt, choose_shots, option_continuation
        from ..evaluation.questions import read_questions

        self.cfg = cfg
        self.questions = read_questions(cfg.data.mcq_dev, cfg.data.language_table)
        shots = choose_shots(self.questions, cfg.training.mcq_shots, cfg.training.seed)
        eos_text = tokenizer.backend.id_to_token(tokenizer.end_of_text_id)
        encode = lambda text: tokenizer.backend.encode(text, add_special_tokens=False).ids  # noqa: E731
        s, pad = cfg.data.seq_length, tokenizer.end_of_text_id
        self.pairs: List[Tuple[int, str]] = []
        rows, truncated = [], set()
        for index, q in enumerate(self.questions):
            prompt = encode(build_loglik_prompt(q, shots[q.qid], eos_text))
            family = registry.expert_id(q.lang)
            for letter in q.letters:
                cont = encode(option_continuation(letter))
                window = (prompt + cont)[-(s + 1):]
                if len(prompt) + len(cont) > s + 1:
                    truncated.add(index)
                tokens = np.full(s, pad, dtype=np.int64)
                labels = np.full(s, pad, dtype=np.int64)
                mask = np.zeros(s, dtype=np.float32)
                n = len(window) - 1
                tokens[:n], labels[:n] = window[:-1], window[1:]
                mask[n - len(cont):n] = 1.0
                rows.append((tokens, labels, mask, family))
                self.pairs.append((index, letter))
        self.truncated = len(truncated)
        self.rows = rows
        self.iterations = math.ceil(len(rows) / cfg.training.global_batch_size)

    def micro_batches(self, iteration: int, dp_rank: int, dp_size: int):
        tr, s = self.cfg.training, self.cfg.data.seq_length
        picked = [self.rows[r] if r < len(self.rows) else None
                  for r in rows_of_batch(iteration * tr.global_batch_size, tr.global_batch_size, dp_rank, dp_size)]
        batches = []
        for i in range(0, len(picked), tr.micro_batch_size):
            part = picked[i:i + tr.micro_batch_size]
            tokens = np.stack([r[0] if r else np.zeros(s, np.int64) for r in part])
            labels = np.stack([r[1] if r else np.zeros(s, np.int64) for r in part])
            mask = np.stack([r[2] if r else np.zeros(s, np.float32) for r in part])
            family = np.stack([np.full(s, r[3] if r else 0, dtype=np.int64) for r in part])
            batches.append({"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                            "loss_mask": torch.from_numpy(mask), "family_ids": torch.from_numpy(family),
                            "position_ids": torch.arange(s).expand(len(part), s).contiguous(),
                            "attention_mask": causal_mask(s)})
        return batches


def open_mcq_dev(cfg: RunConfig, registry: LanguageRegistry, model: List, models: List, forward_backward):
    """The dev-set evaluator of a run with data.mcq_dev, else None. The prompts are encoded with the tokenizer the
    training datasets were preprocessed with (their summary names it)."""
    if not cfg.data.mcq_dev:
        return None
    from ..data.dataset import PreprocessedDataset
    from ..data.tokenizer import load_fast_tokenizer

    path = next((p for p in (PreprocessedDataset.summary_of(spec.prefix).get("tokenizer")
                             for spec in cfg.data.datasets) if p), None)
    if path is None:
        raise TokenizerError("data.mcq_dev: the training datasets' summaries name no tokenizer to encode the dev "
                             "questions with; preprocess them again")
    return McqDevEvaluator(McqDevSet(cfg, registry, load_fast_tokenizer(path)), model, models, forward_backward, cfg)


class McqDevEvaluator:
    def __init__(self, dev: McqDevSet, model: List, models: List, forward_backward, cfg: RunConfig):
        self.dev, self.model, self.models, self.cfg, self.forward_backward = dev, model, models, cfg, forward_backward

    def describe(self) -> str:
        tr = self.cfg.training
        return (f"mcq dev: {len(self.dev.questions)} questions from {len(self.cfg.data.mcq_dev)} file(s), "
                f"{tr.mcq_shots} shots, {len(self.dev.rows)} scoring rows in {self.dev.iterations} global batch(es), "
                + (f"every {tr.mcq_eval_interval} steps and " if tr.mcq_eval_interval else "") + "after the last step"
                + (f"; {self.dev.truncated} prompts longer than data.seq_length keep their end"
                   if self.dev.truncated else ""))

    def run(self) -> dict:
        """Collective. Accuracy overall, per language, major / minor averages, questions cut to fit, seconds."""
        from ..evaluation.scoring import score

        started = time.perf_counter()
        tr = self.cfg.training
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        losses = torch.zeros(self.dev.iterations * tr.global_batch_size, dtype=torch.float64)
        with evaluating(self.model, self.models, self.cfg.parallel.overlap_param_gather):
            for iteration in range(self.dev.iterations):
                reports = forward_only(self.model, scoring_step, self.forward_backward,
                                       self.dev.micro_batches(iteration, dp_rank, dp_size), self.cfg)
                if reports:
                    rows = rows_of_batch(iteration * tr.global_batch_size, tr.global_batch_size, dp_rank, dp_size)
                    losses[rows.start:rows.stop] = torch.cat([r["row loss"] for r in reports]).double().cpu()
        losses = sum_over_job(losses)
        best: Dict[int, Tuple[float, str]] = {}
        for row, (index, letter) in enumerate(self.dev.pairs):
            loss = float(losses[row])
            if index not in best or loss < best[index][0]:  # ties: the earlier letter
                best[index] = (loss, letter)
        questions = self.dev.questions
        predictions = {q.qid: best[i][1] for i, q in enumerate(questions)}
        scores = score(questions, predictions, self.cfg.data.language_table)
        return {"accuracy": scores.correct / scores.questions, "questions": scores.questions,
                "major_average": scores.major_average, "minor_average": scores.minor_average,
                "per_language": {code: lang.accuracy for code, lang in scores.per_language.items()},
                "truncated": self.dev.truncated, "seconds": time.perf_counter() - started}
