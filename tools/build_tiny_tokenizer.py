"""Rebuild examples/tokenizer from the bundled sample corpora, text and chat (the repo ships the result).

    python tools/build_tiny_tokenizer.py [--out examples/tokenizer] [--vocab-size 1024]
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_medmoe.data.chat import conversation_turns, render_apollo  # noqa: E402
from megatron_medmoe.data.tokenizer import train_bpe_tokenizer  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "examples", "tokenizer"))
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    texts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "data", "text", "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "data", "chat", "*.jsonl"))):
        with open(path, encoding="utf-8") as f:  # as the chat template renders them, without end-of-text
            texts += [render_apollo(conversation_turns(json.loads(line)), "")[0] for line in f if line.strip()]
    train_bpe_tokenizer(texts, args.out, args.vocab_size)
    print(f"wrote {args.out} from {len(texts)} documents")


if __name__ == "__main__":
    main()
