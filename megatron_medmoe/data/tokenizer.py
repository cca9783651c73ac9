"""Tokenizers: any local Hugging Face tokenizer directory; a small BPE one can be trained for demos."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, List

END_OF_TEXT = "<|endoftext|>"  # Qwen2's document separator and end-of-answer token


class TokenizerError(OSError):
    """A tokenizer directory that is missing or cannot be loaded."""


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local directory (never downloads)."""
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer directory {path!r} does not exist")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot load a Hugging Face tokenizer from {path!r}: {e}") from e


@dataclass(frozen=True)
class FastTokenizer:
    """A tokenizer directory's tokenizer.json through the `tokenizers` library alone: what preprocessing
    needs, without importing transformers (seconds per process)."""

    backend: object  # tokenizers.Tokenizer
    vocab_size: int
    end_of_text_id: int


def load_fast_tokenizer(path: str) -> FastTokenizer:
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer directory {path!r} does not exist")
    if not os.path.isfile(file):
        raise TokenizerError(f"{path}: no tokenizer.json; preprocessing needs a fast (Rust) tokenizer")
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(file)
    except Exception as e:  # the Rust loader raises its own exception type
        raise TokenizerError(f"cannot load {file}: {e}") from e
    eos = None
    config_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
    eod = backend.token_to_id(eos) if eos else None
    if eod is None:
        eod = backend.token_to_id(END_OF_TEXT)
    if eod is None:
        raise TokenizerError(f"{path}: no eos_token and no {END_OF_TEXT!r}: cannot end documents")
    return FastTokenizer(backend, backend.get_vocab_size(with_added_tokens=True), int(eod))


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1024) -> None:
    """Train a byte-level BPE tokenizer (the Qwen2 family's kind) and save it as a Hugging Face
    tokenizer directory, with <|endoftext|> as the end-of-text and padding token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts: List[str] = list(texts)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
