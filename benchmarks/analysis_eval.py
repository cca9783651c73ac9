"""LAPE counting throughput and multiple-choice evaluation throughput of a checkpoint (the tiny model on CPU).

    python benchmarks/analysis_eval.py [--ckpt runs/tiny/checkpoints/sft] [--repeats 3]

In one process (one rank, eval mode): LAPE counting (forward passes with the SwiGLU neuron counter attached)
over the bundled text of 16 languages, tokens/s, against the same forward passes without the counter; then
the bundled 65 multiple-choice questions, questions/s, in generate mode (greedy, KV cache, up to 32 new
tokens) and log-likelihood mode. Medians over --repeats. Needs a checkpoint: `make demo` writes the default.
"""
import argparse
import glob
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=os.path.join(ROOT, "runs", "tiny", "checkpoints", "sft"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    from megatron_medmoe.runtime.cpu_compat import import_megatron_core_deferring_compile
    from megatron_medmoe.runtime.quiet import silence_known_noise

    silence_known_noise()
    import_megatron_core_deferring_compile()
    from megatron_medmoe.analysis.inputs import AnalysisInputs, language_batches, open_analysis
    from megatron_medmoe.analysis.neurons import NeuronCounter
    from megatron_medmoe.evaluation.mcq import McqOptions, answer_all
    from megatron_medmoe.evaluation.questions import choose_shots, read_questions
    from megatron_medmoe.inference.loaded import model_tokenizer
    from megatron_medmoe.runtime.env import DistEnv
    from megatron_medmoe.runtime.launch import free_port

    env = DistEnv("local", 0, 1, 0, "127.0.0.1", free_port())
    data = [f"{os.path.basename(p)[:-6]}={p}" for p in sorted(glob.glob(os.path.join(ROOT, "examples", "data", "text", "*.jsonl")))]
    loaded, texts = open_analysis(AnalysisInputs(args.ckpt, data, output=""), env)
    tokens = sum(t.tokens for t in texts.values())

    def forward_all(counter=None):
        start = time.perf_counter()
        for lang, text in texts.items():
            if counter is not None:
                counter.language = lang
            for batch, family in language_batches(loaded, text, 8):
                loaded.logits(batch, family)
        return time.perf_counter() - start

    plain = statistics.median(forward_all() for _ in range(args.repeats))
    counting = []
    for _ in range(args.repeats):
        with NeuronCounter(loaded.model, list(texts)) as counter:
            counting.append(forward_all(counter))
    counting = statistics.median(counting)
    print(f"LAPE counting: {tokens} tokens, {len(texts)} languages: {tokens / counting:.0f} tokens/s "
          f"(forward passes alone {tokens / plain:.0f} tokens/s)")

    tokenizer = model_tokenizer(loaded)
    questions = read_questions(sorted(glob.glob(os.path.join(ROOT, "examples", "data", "mcq", "*.jsonl"))))
    shots = choose_shots(questions, 3, 0)
    for mode in ("generate", "loglik"):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            answer_all(loaded, tokenizer, questions, shots, McqOptions(args.ckpt, [], mode=mode))
            times.append(time.perf_counter() - start)
        print(f"evaluation, {mode}: {len(questions)} questions: {len(questions) / statistics.median(times):.2f} questions/s")


if __name__ == "__main__":
    main()
