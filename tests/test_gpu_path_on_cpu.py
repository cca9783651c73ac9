"""The GPU code path, run on CPU over gloo (runtime/device.py's test switch): bf16 parameters in megatron-core's
Float16Module, its mixed-precision distributed optimizer with fp32 main parameters, both optimizer checkpoint
formats and gradient reduction during the backward pass, in real `medmoe train` processes on 2 ranks. A
weights-only load trains the loaded weights; a resume is bitwise the run never stopped; dp_reshardable state is
refused under another layout; fully_reshardable state (memory-efficient, keyed by parameter) continues under
another layout."""
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_DATA, cpu_env, read_metrics, run_medmoe, tiny_config, train_stage
from megatron_medmoe.runtime.device import GPU_PATH_ON_CPU_ENV
from megatron_medmoe.runtime.exit_codes import EXIT_INPUT

GPU_PATH = {GPU_PATH_ON_CPU_ENV: "1"}
STEPS = 5
BF16 = ["training.precision=bf16", "training.global_batch_size=8", "training.micro_batch_size=2",
        "logging.log_interval=1"]
# one schedule wherever a run stops, from the trained weights with a fresh optimizer
FROM_TRAINED = [*BF16, "training.lr=1.0e-3", "training.lr_warmup_steps=1", f"training.lr_decay_steps={STEPS}",
                "checkpoint.finetune=true"]
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=20000"]  # several buckets
PP2 = ["parallel.pipeline=2", "parallel.expert=1"]  # EP 1: no expert optimizer; stage 0: no MoE layers


def train(out, *overrides, check=True):
    return run_medmoe(train_stage("cpt", *overrides, f"logging.output_dir={out}"), check=check, **GPU_PATH)


def trajectory(records):
    return [(r["step"], r["loss"], r["family_loss"], r["grad_norm"]) for r in records if "loss" in r]


def checkpoint_layout(checkpoint_dir):
    return torch.load(checkpoint_dir / "common.pt", weights_only=False)["train_state"]["layout"]


def saved_tensors(checkpoint_dir):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """12 steps at a high learning rate on EP 2 (DP 2 for the dense parameters): its loss is well below a fresh
    model's, ln V."""
    root = tmp_path_factory.mktemp("gpu_path")
    train(root / "trained", *BF16, "training.train_steps=12", "training.lr=1.0e-2", "training.lr_warmup_steps=2",
          f"checkpoint.save={root / 'ckpt'}")
    return root, root / "ckpt" / "cpt"


@pytest.fixture(scope="module")
def finetuned(trained):
    """STEPS steps from the trained weights (weights only), never stopped."""
    root, checkpoint = trained
    proc = train(root / "finetuned", *FROM_TRAINED, f"checkpoint.load={checkpoint}", f"training.train_steps={STEPS}",
                 "checkpoint.save=null")
    return proc, read_metrics(root / "finetuned", "cpt")


@pytest.mark.multiprocess
def test_the_gpu_path_saves_bf16_weights_and_the_distributed_optimizers_state(trained):
    _, checkpoint = trained
    saved = checkpoint / "iter_0000012"
    assert checkpoint_layout(saved)["optimizer"] == "distributed:dp_reshardable"
    tensors = saved_tensors(saved)
    assert tensors["embedding.word_embeddings.weight"].properties.dtype == torch.bfloat16
    buckets = [k for k in tensors if k.startswith("chained_0.optimizer.distributed.") and k.endswith(".param")]
    assert buckets and all(tensors[k].properties.dtype == torch.float32 for k in buckets)  # fp32 main params


@pytest.mark.multiprocess
def test_finetuning_in_bf16_trains_the_loaded_weights(trained, finetuned):
    """The distributed optimizer's fp32 main copies, made when it was built, must take the loaded weights: else
    step 1 writes the initial weights back and the loss returns to about ln V."""
    proc, records = finetuned
    assert "initialized the model weights from" in proc.stdout
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    fresh = math.log(tiny_config("cpt").model.vocab_size)
    losses = [r["loss"] for r in records]
    assert all(loss < fresh - 0.4 for loss in losses), (losses, fresh)
    assert abs(losses[1] - losses[0]) < 0.2, losses


@pytest.mark.multiprocess
def test_a_bf16_resume_is_bitwise_the_run_never_stopped(trained, finetuned):
    """dp_reshardable: main params, Adam's moments and step, schedule and data position, stopped after step 2."""
    root, checkpoint = trained
    save, out = root / "dp" / "ckpt", root / "dp" / "out"
    common = [*FROM_TRAINED, f"checkpoint.load={checkpoint}", f"checkpoint.save={save}"]
    train(out, *common, "training.train_steps=2")
    again = train(out, *common, f"training.train_steps={STEPS}")
    assert f"resuming from {save / 'cpt'} at step 2 (row 16)" in again.stdout
    assert trajectory(read_metrics(out, "cpt")) == trajectory(finetuned[1])  # floats compared exactly


@pytest.mark.multiprocess
def test_overlapped_weight_gathering_saves_and_resumes_bitwise(trained, finetuned):
    """parallel.overlap_param_gather: the updated weights are gathered during the next forward pass, so at a save
    the model's weights lag the optimizer; the save gathers them first. Stopped after step 2 and resumed, the run
    is bitwise the one that gathers them right after each step and never stopped (same gradient buckets). It
    validates after every step too (bf16, the distributed optimizer's lagging weights gathered first), which
    changes no training step."""
    root, checkpoint = trained
    start = [*FROM_TRAINED, *OVERLAP, f"checkpoint.load={checkpoint}"]
    train(root / "opg-ref", *start, f"training.train_steps={STEPS}", "checkpoint.save=null")
    save, out = root / "opg" / "ckpt", root / "opg" / "out"
    common = [*start, "parallel.overlap_param_gather=true", f"checkpoint.save={save}",
              f"data.validation=[{{prefix: {TINY_DATA['chat']}}}]", "training.eval_interval=1", "training.eval_iters=1"]
    train(out, *common, "training.train_steps=2")
    again = train(out, *common, f"training.train_steps={STEPS}")
    assert f"resuming from {save / 'cpt'} at step 2 (row 16)" in again.stdout
    assert trajectory(read_metrics(out, "cpt")) == trajectory(read_metrics(root / "opg-ref", "cpt"))
    assert [r["step"] for r in read_metrics(out, "cpt") if "validation" in r] == list(range(1, STEPS + 1))


@pytest.mark.multiprocess
def test_dp_reshardable_state_is_refused_under_another_layout(trained):
    root, checkpoint = trained
    proc = train(root / "refused", *BF16, f"checkpoint.load={checkpoint}", "training.train_steps=14", *PP2,
                 "checkpoint.save=null", check=False)
    assert proc.returncode == EXIT_INPUT, proc.stderr[-3000:]
    assert "saved its optimizer state dp_reshardable under TP 1, PP 1, EP 2, gradient buckets one" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.multiprocess
def test_fully_reshardable_state_continues_under_another_layout(trained, finetuned):
    """Saved at step 2 under EP 2 x DP 2 (gradients reduced in several buckets during the backward pass), continued
    under PP 2 (EP 1: the expert parameters join the dense optimizer, and stage 0 holds no MoE layer), close to the
    run never stopped. Not exactly: the other layout computes in other groupings (the experts' tokens in one
    batch, the fp32 gradients summed in one rank's buffer instead of a reduce-scatter of two), and last-bit
    differences flip some bf16 roundings of the weights. Measured: at most 5e-6 relative over steps 3-5, where a
    fresh optimizer state after step 2 is about 1e-3 off, and megatron-core's bucket-offset bug 0.15."""
    root, checkpoint = trained
    save, out = root / "fr" / "ckpt", root / "fr" / "out"
    common = [*FROM_TRAINED, f"checkpoint.load={checkpoint}", f"checkpoint.save={save}",
              "checkpoint.optimizer_format=fully_reshardable"]
    first = train(out, *common, *OVERLAP, "training.train_steps=2")
    assert "exceeds unpadded buffer" not in first.stdout + first.stderr  # megatron-core's sign of the bucket bug
    saved = save / "cpt" / "iter_0000002"
    assert checkpoint_layout(saved)["optimizer"] == "distributed:fully_reshardable"
    keys = saved_tensors(saved)
    assert "optimizer.state.exp_avg.decoder.layers.3.mlp.experts.experts.linear_fc1.weight" in keys  # no chained_N.

    again = train(out, *common, *PP2, f"training.train_steps={STEPS}")
    assert f"resuming from {save / 'cpt'} at step 2 (row 16)" in again.stdout
    expected = [r["loss"] for r in finetuned[1]]
    losses = [r["loss"] for r in read_metrics(out, "cpt")]
    assert losses[:2] == expected[:2]  # unclipped steps: buckets change no sum
    assert losses[2:] == pytest.approx(expected[2:], rel=1e-4, abs=0)


def test_the_distributed_optimizers_fixes_apply_on_gpus_too():
    """runtime/cpu_compat.py's torch_adam_steps (needed wherever TransformerEngine and apex are absent) and
    fully_reshardable_bucket_offsets (a megatron-core 0.16.1 bug) apply on GPUs too (simulated: the GPU check
    answers yes)."""
    code = ("import torch; from megatron_medmoe.runtime import cpu_compat; cpu_compat.gpu_present = lambda: True; "
            "assert cpu_compat.apply_if_cpu() is False; from megatron.core.optimizer import distrib_optimizer as d; "
            "o = d.DistributedOptimizer; print(d.HAVE_APEX_OR_TE, hasattr(o.load_state_dict, '__wrapped__'), "
            "hasattr(o.sharded_param_state_fully_reshardable, '__wrapped__'), type(torch.Tensor.cuda).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the CPU redirects stay off: Tensor.cuda is torch's own
    assert proc.stdout.split() == ["False", "True", "True", "method_descriptor"], proc.stdout


@pytest.mark.multiprocess
def test_dp_reshardable_state_continues_under_another_data_parallel_size(tmp_path):
    """Megatron-LM#5898 says dp_reshardable state keeps each bucket's end padding, which moves when the data-parallel
    size does (megatron-core pads the distributed optimizer's buckets to a multiple of lcm(DP, 128): 128 at DP 1,
    384 at DP 3). Saved after step 1 at DP 1 and resumed at DP 3 (same TP, PP, EP), the run stays within 1e-6 of
    the one never stopped (measured: 5e-8; misplaced Adam moments would be ~1e-3 off at step 3, whose weights the
    loaded moments updated)."""
    common = ["training.precision=bf16", "training.global_batch_size=6", "training.micro_batch_size=2",
              "logging.log_interval=1", *OVERLAP, "training.lr=1e-3", "training.lr_warmup_steps=1",
              "training.lr_decay_steps=3", "parallel.expert=1", "moe.expert_slots=null"]
    train(tmp_path / "ref", *common, "training.train_steps=3", "parallel.data=1", "checkpoint.save=null")
    save = f"checkpoint.save={tmp_path / 'ckpt'}"
    train(tmp_path / "out", *common, "training.train_steps=1", "parallel.data=1", save)
    again = train(tmp_path / "out", *common, "training.train_steps=3", "parallel.data=3", save)
    assert "resuming from" in again.stdout and "(TP 1, PP 1, EP 1, DP 3)" in again.stdout
    resumed, reference = read_metrics(tmp_path / "out", "cpt"), read_metrics(tmp_path / "ref", "cpt")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in reference], rel=1e-6, abs=0)
