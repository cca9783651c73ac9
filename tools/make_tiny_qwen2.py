"""Write a small random dense Qwen2 in Hugging Face format, shaped like the tiny recipe's model, with the
bundled tokenizer: a stand-in for a downloaded Qwen2 checkpoint (no machine here reaches a model hub).

    python tools/make_tiny_qwen2.py --out runs/hf/qwen2-tiny [--seed 0] [--untied]

It is built with transformers' own Qwen2Config and Qwen2ForCausalLM and written with save_pretrained.
"""
import argparse
import os
import shutil
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="new Hugging Face model directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untied", action="store_true", help="a separate output layer (default: tied, as 0.5B)")
    args = parser.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_medmoe.config import load_stages
    from megatron_medmoe.data.tokenizer import load_fast_tokenizer

    tokenizer_dir = os.path.join(ROOT, "examples", "tokenizer")
    tokenizer = load_fast_tokenizer(tokenizer_dir)
    m = load_stages(os.path.join(ROOT, "examples", "tiny.yaml"))[0].config.model
    config = Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                         num_key_value_heads=m.num_query_groups, max_position_embeddings=m.max_position_embeddings,
                         rope_theta=m.rotary_base, rms_norm_eps=m.norm_epsilon, tie_word_embeddings=not args.untied,
                         eos_token_id=tokenizer.end_of_text_id, bos_token_id=None)
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # transformers starts biases at zero; a trained Qwen2's are not
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    model.save_pretrained(args.out)
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(args.out, name))
    print(f"wrote {args.out}: Qwen2, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"vocabulary {tokenizer.vocab_size}")


if __name__ == "__main__":
    main()
