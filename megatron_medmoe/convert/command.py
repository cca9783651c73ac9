"""`medmoe convert hf-to-mcore | mcore-to-hf | verify`: options in, exit code out (0 done, 1 verification
failed, 2 bad options, 3 bad input)."""
from __future__ import annotations

import sys

from ..runtime.exit_codes import EXIT_CONFIG, EXIT_FAILURE, EXIT_INPUT, EXIT_OK
from .errors import ConvertError


def _report(agreement) -> int:
    print(f"verify: {agreement.describe()}", flush=True)
    return EXIT_OK if agreement.passed else EXIT_FAILURE


def convert_command(args) -> int:
    from ..config import ConfigError
    from ..languages import LanguageTableError

    try:
        if args.convert == "hf-to-mcore":
            from .hf_to_mcore import hf_to_mcore

            layout = {"tensor": args.tensor, "pipeline": args.pipeline, "expert": args.expert}
            out = hf_to_mcore(args.hf, args.out, args.upcycle_last_n, args.language_table, args.seed, layout,
                              quiet=args.quiet)
            print(f"wrote {out} (load it with checkpoint.load={out} checkpoint.finetune=true)", flush=True)
            if args.verify:
                from .verify import verify, verify_upcycled

                check = verify_upcycled if args.upcycle_last_n else verify
                return _report(check(args.hf, out))
        elif args.convert == "mcore-to-hf":
            from .mcore_to_hf import mcore_to_hf

            out = mcore_to_hf(args.ckpt, args.out, args.format, args.tokenizer, args.max_shard_size, args.dtype,
                              quiet=args.quiet)
            print(f"wrote {out} ({args.format})", flush=True)
            if args.verify:
                from .verify import verify

                return _report(verify(out, args.ckpt))
        else:
            from .verify import verify, verify_upcycled

            check = verify_upcycled if args.upcycled else verify
            return _report(check(args.hf, args.ckpt, args.batch_size, args.seq_length))
    except (ConvertError, LanguageTableError) as e:
        print(f"medmoe convert: {e}", file=sys.stderr)
        return EXIT_INPUT
    except ConfigError as e:
        print(f"medmoe convert: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def add_convert_parser(commands) -> None:
    conv = commands.add_parser(
        "convert", help="Hugging Face <-> megatron-core checkpoints, verified against transformers",
        description="Convert between Hugging Face Qwen2 / Qwen2-MoE / ApolloMoE directories and our torch_dist "
                    "checkpoints (layout-free: they load under any TP/PP/EP). --verify compares logits with "
                    "transformers' own model. Exit codes: 0 done, 1 verification failed, 2 bad options, 3 bad input.")
    sub = conv.add_subparsers(dest="convert", required=True, metavar="DIRECTION")
    h2m = sub.add_parser("hf-to-mcore", help="a Hugging Face directory to our checkpoint")
    h2m.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model directory (safetensors)")
    h2m.add_argument("--out", required=True, metavar="DIR", help="new save directory for the checkpoint")
    h2m.add_argument("--upcycle-last-n", type=int, metavar="N",
                     help="dense Qwen2 only: make the last N layers MoE, every expert a copy of the dense MLP")
    h2m.add_argument("--language-table", metavar="TABLE",
                     help="experts: families (7), languages12 (12) or a YAML table; default: from the model")
    h2m.add_argument("--seed", type=int, default=1234, help="seed of the fresh routers when upcycling (default 1234)")
    h2m.add_argument("--tensor", type=int, default=1, help="check that the model splits into this TP size")
    h2m.add_argument("--pipeline", type=int, default=1, help="check that the model splits into this PP size")
    h2m.add_argument("--expert", type=int, default=1, help="check that the experts split into this EP size")
    h2m.add_argument("--verify", action="store_true", help="then compare logits with transformers' model")
    h2m.add_argument("--quiet", action="store_true", help="no progress line")
    m2h = sub.add_parser("mcore-to-hf", help="one of our checkpoints (any layout) to a Hugging Face directory")
    m2h.add_argument("--ckpt", required=True, metavar="DIR", help="a checkpoint or a save directory (its latest)")
    m2h.add_argument("--out", required=True, metavar="DIR", help="new Hugging Face directory")
    m2h.add_argument("--format", required=True, choices=["qwen2_moe", "apollo_moe", "qwen2"],
                     help="qwen2_moe: stock transformers Qwen2-MoE; apollo_moe: the released ApolloMoE layout; "
                          "qwen2: dense models")
    m2h.add_argument("--tokenizer", metavar="DIR", help="tokenizer files to include (default: the checkpoint's)")
    m2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    m2h.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    m2h.add_argument("--verify", action="store_true", help="then compare logits with transformers' model")
    m2h.add_argument("--quiet", action="store_true", help="no progress line")
    ver = sub.add_parser("verify", help="compare our checkpoint's logits with transformers' model")
    ver.add_argument("--hf", required=True, metavar="DIR", help="Hugging Face model directory")
    ver.add_argument("--ckpt", required=True, metavar="DIR", help="our checkpoint or save directory")
    ver.add_argument("--upcycled", action="store_true",
                     help="the checkpoint upcycles the dense --hf model: expect each MoE layer to give "
                          "(p_a + p_b) x the dense MLP")
    ver.add_argument("--batch-size", type=int, default=2)
    ver.add_argument("--seq-length", type=int, default=64)
    conv.set_defaults(func=convert_command)
