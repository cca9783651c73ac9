"""Our per-token loss and vocabulary-parallel logits on a checkpoint, as the ranks of a tensor-parallel job.

    torchrun --nproc-per-node N padded_vocab_loss.py CKPT TOKENS.pt OUT_DIR

TOKENS.pt holds token rows [b, s]; the model reads tokens[:, :-1] with labels tokens[:, 1:]. The loss goes
through the training path (labels given, gradients on, then a backward pass); the logits are this rank's
slice of the padded vocabulary, not gathered. Each rank writes OUT_DIR/rank{r}.pt: {"loss": [b, s-1],
"logits": [b, s-1, padded vocab / N], "output_grad": this rank's rows of the output weight's gradient}.
"""
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

from megatron_medmoe.runtime.cpu_compat import import_megatron_core_deferring_compile  # noqa: E402

import_megatron_core_deferring_compile()

from megatron_medmoe.data.batches import causal_mask  # noqa: E402
from megatron_medmoe.inference.loaded import load_model  # noqa: E402
from megatron_medmoe.runtime.distributed import shutdown_distributed  # noqa: E402
from megatron_medmoe.runtime.env import detect_launch_env  # noqa: E402


def main(ckpt: str, tokens_path: str, out_dir: str) -> None:
    env = detect_launch_env()
    model = load_model(ckpt, env.world_size, env).model
    tokens = torch.load(tokens_path)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand(inputs.shape[0], -1)
    mask = causal_mask(inputs.shape[1])
    loss = model(inputs, positions, mask, labels=labels)
    loss.sum().backward()
    weight = model.shared_embedding_or_output_weight()
    with torch.no_grad():
        logits = model(inputs, positions, mask)
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"loss": loss.detach(), "logits": logits, "output_grad": weight.grad},
               os.path.join(out_dir, f"rank{env.rank}.pt"))
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
