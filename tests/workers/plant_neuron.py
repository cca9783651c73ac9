"""Plant a language-specific neuron into a checkpoint and save the result.

    python plant_neuron.py SOURCE_CKPT OUT_SAVE_DIR NEURON TOKEN_ID...

The planted neuron is NEURON of the first layer's dense MLP (layer 1 in neurons.json), and it fires exactly on the listed tokens: their
embeddings get +0.05 in hidden dimension 0, every other token -0.05; that layer's attention writes nothing to
dimension 0 (its output projection's row 0 is zeroed), so the MLP's normed input has the sign of the token's
mark at dimension 0; the neuron's gate row reads only dimension 0 (x 10), so gate > 0 iff the token is listed.
"""
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

from megatron_medmoe.inference.loaded import load_model  # noqa: E402
from megatron_medmoe.runtime.cpu_compat import import_megatron_core_deferring_compile  # noqa: E402
from megatron_medmoe.runtime.env import DistEnv  # noqa: E402
from megatron_medmoe.runtime.launch import free_port  # noqa: E402

import_megatron_core_deferring_compile()
from megatron_medmoe.runtime.distributed import shutdown_distributed  # noqa: E402
from megatron_medmoe.training.checkpoint import TrainState, current_layout, save_checkpoint  # noqa: E402


def main():
    source, out, neuron, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(t) for t in sys.argv[4:]]
    loaded = load_model(source, 1, DistEnv("local", 0, 1, 0, "127.0.0.1", free_port()))
    model = loaded.model
    with torch.no_grad():
        emb = model.embedding.word_embeddings.weight
        emb[:, 0] = -0.05  # the size of the other coordinates: the rest of the model works as before
        emb[tokens, 0] = 0.05
        layer0 = model.decoder.layers[0]
        layer0.self_attention.linear_proj.weight[0, :] = 0.0
        fc1 = layer0.mlp.linear_fc1.weight  # [gate; up]
        fc1[neuron, :] = 0.0
        fc1[neuron, 0] = 10.0
    save_checkpoint(out, TrainState(iteration=1, layout=current_layout(loaded.cfg, False)), [model], loaded.cfg)
    shutdown_distributed()


if __name__ == "__main__":  # checkpoint writers are spawned processes
    main()
