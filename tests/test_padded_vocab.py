"""The padded vocabulary rows take no part in the model's distribution.

The vocabulary is padded to a multiple of model.make_vocab_size_divisible_by (301 -> 384 here) and a
conversion fills the padded rows with zeros. Our training loss and our logits must still be transformers'
own for the same weights, in one process and with the vocabulary split over TP 2 (real gloo processes):
the padded columns are masked, so they hold no probability and their rows get no gradient.
"""
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cpu_env
from test_convert import dense_qwen2
from megatron_medmoe.convert.hf_to_mcore import hf_to_mcore

VOCAB, PADDED = 301, 384
WORKER = str(REPO / "tests" / "workers" / "padded_vocab_loss.py")


@pytest.fixture(scope="module")
def odd_vocab(tmp_path_factory):
    """(transformers' model, our converted checkpoint, token rows [3, 17]) for a Qwen2 with vocabulary 301."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("odd_vocab")
    hf = dense_qwen2(root / "hf", vocab_size=VOCAB)
    ckpt = hf_to_mcore(hf, str(root / "ckpt"), quiet=True)
    tokens = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    return AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval(), ckpt, tokens


def reference(theirs, tokens):
    """transformers' next-token logits [b, s-1, vocab] and per-token cross-entropy [b, s-1]."""
    with torch.no_grad():
        logits = theirs(input_ids=tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none")
    return logits, loss.reshape(tokens.shape[0], -1)


def assert_masked(logits, output_grad, theirs_logits):
    """Every padded column below any real logit, the softmax over all 384 columns transformers' own, and no
    gradient into a padded row of the output weight."""
    assert logits.shape[-1] == PADDED
    assert logits[..., VOCAB:].max() < logits[..., :VOCAB].min() - 1e30
    torch.testing.assert_close(torch.softmax(logits.double(), -1)[..., :VOCAB],
                               torch.softmax(theirs_logits.double(), -1), atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(output_grad[VOCAB:]) == 0 and torch.count_nonzero(output_grad[:VOCAB]) > 0


def test_one_process_loss_is_transformers_cross_entropy(odd_vocab, megatron_single_rank):
    from megatron_medmoe.convert.verify import our_model
    from megatron_medmoe.data.batches import causal_mask

    theirs, ckpt, tokens = odd_vocab
    logits_ref, loss_ref = reference(theirs, tokens)
    ours, _ = our_model(ckpt)
    inputs = tokens[:, :-1]
    positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand(inputs.shape[0], -1)
    loss = ours(inputs, positions, causal_mask(inputs.shape[1]), labels=tokens[:, 1:])
    loss.sum().backward()
    torch.testing.assert_close(loss.detach(), loss_ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        logits = ours(inputs, positions, causal_mask(inputs.shape[1]))
    assert_masked(logits, ours.shared_embedding_or_output_weight().grad, logits_ref)


@pytest.mark.multiprocess
def test_tensor_parallel_loss_is_transformers_cross_entropy(odd_vocab, tmp_path):
    """TP 2: rank 0 holds columns 0-191 (all real), rank 1 columns 192-383 (real up to 300)."""
    theirs, ckpt, tokens = odd_vocab
    logits_ref, loss_ref = reference(theirs, tokens)
    torch.save(tokens, tmp_path / "tokens.pt")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           WORKER, ckpt, str(tmp_path / "tokens.pt"), str(tmp_path / "out")], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:  # vocabulary-parallel cross-entropy: every rank has the whole loss
        torch.testing.assert_close(rank["loss"], loss_ref, atol=1e-5, rtol=1e-5)
    assert [r["logits"].shape[-1] for r in ranks] == [PADDED // 2] * 2
    assert_masked(torch.cat([r["logits"] for r in ranks], -1), torch.cat([r["output_grad"] for r in ranks]),
                  logits_ref)
