"""Probe what megatron-core does on a CPU-only torch, with or without our redirects.

    python cpu_compat_probe.py all          every redirect applied; every probe runs
    python cpu_compat_probe.py skip NAME    every redirect but NAME applied; only NAME's probe runs
    python cpu_compat_probe.py each A B ... the above for A, B, ... ("all" or a redirect's name), each in a
                                            process forked after megatron-core's import (it costs seconds)

Prints one JSON object, probe name -> outcome ("ok" or the exception type), so the test can tell
"still needed" (its probe fails without it) from "works" (ok with all of them); `each` prints one object
with an entry per mode.
"""
import inspect
import json
import multiprocessing
import os
import socket
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def outcome(fn):
    try:
        result = fn()
        return "ok" if result in (None, True) else f"unexpected:{result}"
    except Exception as e:  # the type is the finding
        return type(e).__name__


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_rank():
    from megatron.core import parallel_state

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()


def apply_redirects(skip):
    from megatron_medmoe.runtime import cpu_compat

    cpu_compat.import_megatron_core_deferring_compile()

    for redirect in cpu_compat.REDIRECTS:
        if redirect.name != skip:
            redirect.apply()


def uneven_worker(rank, port, skip, results):
    apply_redirects(skip)
    import megatron.core.tensor_parallel.mappings as mappings

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group = dist.new_group([0, 1])
    sizes = [1, 2]

    def gather_and_scatter():
        x = torch.full((sizes[rank], 3), float(rank + 1))
        gathered = mappings._gather_along_first_dim(x, group, output_split_sizes=sizes)
        expected = torch.cat([torch.full((1, 3), 1.0), torch.full((2, 3), 2.0)])
        assert torch.equal(gathered, expected), gathered
        y = torch.arange(9, dtype=torch.float32).reshape(3, 3) * (rank + 1)
        scattered = mappings._reduce_scatter_along_first_dim(y, group, input_split_sizes=sizes)
        full = torch.arange(9, dtype=torch.float32).reshape(3, 3) * 3
        assert torch.equal(scattered, torch.split(full, sizes)[rank]), scattered

    results[rank] = outcome(gather_and_scatter)
    dist.barrier()
    dist.destroy_process_group()


def distributed_optimizer(resume_format=None):
    """megatron-core's bf16 distributed optimizer over two bf16 weights in two gradient buckets: built and stepped
    (gradient norm and clipping included); with `resume_format`, also saved in that format and loaded into a
    fresh one, which must then hold the same main params and moments, and in every parameter a step tensor of
    its own, the checkpoint's."""
    import tempfile

    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import MegatronModule

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, bf16=True,
                               params_dtype=torch.bfloat16, use_cpu_initialization=True)

    class TwoWeights(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.first = torch.nn.Parameter(torch.full((4, 8), 0.5, dtype=torch.bfloat16))
            self.second = torch.nn.Parameter(torch.full((3, 8), -0.25, dtype=torch.bfloat16))

    def build():
        ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                            overlap_grad_reduce=True, bucket_size=20)  # a bucket per weight
        model = DistributedDataParallel(config, ddp, TwoWeights())
        assert len(model.buffers[0].buckets) == 2
        return model, get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=0.1, bf16=True, clip_grad=1.0, params_dtype=torch.bfloat16,
            use_distributed_optimizer=True), [model])

    def sharded(model, optimizer, is_loading):
        weights = model.module.sharded_state_dict()
        metadata = {"distrib_optim_sharding_type": resume_format, "distrib_optim_fully_reshardable_mem_efficient": True}
        return {"model": weights, "optimizer": optimizer.sharded_state_dict(weights, is_loading=is_loading,
                                                                            metadata=metadata)}

    def states(optimizer):
        return [(p.detach().clone(), {k: v for k, v in inner.state[p].items()})
                for member in optimizer.chained_optimizers for inner in [member.optimizer]
                for g in inner.param_groups for p in g["params"]]

    model, optimizer = build()
    model.zero_grad_buffer()
    (model.module.first.float() * 100).sum().add((model.module.second.float() * 10).sum()).backward()
    model.finish_grad_sync()
    updated, norm, _ = optimizer.step()
    assert updated and norm > 1.0, norm  # clipped
    if resume_format is None:
        return True
    before = [(p, {k: v.clone() for k, v in state.items()}) for p, state in states(optimizer)]
    directory = tempfile.mkdtemp()
    dist_checkpointing.save(sharded(model, optimizer, False), directory)
    model, optimizer = build()
    optimizer.load_state_dict(dist_checkpointing.load(sharded(model, optimizer, True), directory)["optimizer"])
    after = states(optimizer)
    steps = [state["step"] for _, state in after]
    same = all(torch.equal(p, q) and all(torch.equal(s[k], t[k]) for k in s) for (p, s), (q, t) in zip(before, after))
    return same and len(after) == 2 and len({id(s) for s in steps}) == len(steps)


def main(mode, skip=None):
    apply_redirects(skip)
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.router as router
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.utils as utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    import numpy as np

    init_single_rank()
    probes = {
        "device_queries": lambda: torch.cuda.current_device() is not None and torch.cuda.synchronize(),
        "rng_states": lambda: model_parallel_cuda_manual_seed(1),
        "streams_and_events": lambda: torch.cuda.Stream().wait_stream(torch.cuda.current_stream()),
        "tensor_cuda_method": lambda: torch.zeros(2).cuda().device.type == "cpu",
        "te_general_gemm_symbol": lambda: moe_utils.router_gating_linear(
            torch.randn(4, 8), torch.randn(3, 8), None, torch.float32).shape == (4, 3),
        "host_split_sizes": lambda: isinstance(
            token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True), np.ndarray),
        "schedule_device_literal": lambda: schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu",
        "optimizer_device_literals": distributed_optimizer,
        "cuda_type_names": distributed_optimizer,
        "torch_adam_steps": lambda: distributed_optimizer("dp_reshardable"),
        "fully_reshardable_bucket_offsets": lambda: distributed_optimizer("fully_reshardable"),
    }
    # the megatron-core code still calls what the redirects replace
    sources = {
        "device_queries": "torch.cuda.current_device()" in inspect.getsource(router),
        "streams_and_events": "torch.cuda.Stream()" in inspect.getsource(token_dispatcher),
        "tensor_cuda_method": ".cuda()" in inspect.getsource(LanguageModule.setup_embeddings_and_output_layer),
        "schedule_device_literal": 'device="cuda"' in inspect.getsource(schedules.forward_backward_no_pipelining),
        "optimizer_device_literals": "device='cuda'" in inspect.getsource(optimizer.MixedPrecisionOptimizer.__init__)
        and "device='cuda'" in inspect.getsource(clip_grads.clip_grad_by_total_norm_fp32)
        and 'device="cuda"' in inspect.getsource(utils.local_multi_tensor_l2_norm),
        "cuda_type_names": "'torch.cuda.BFloat16Tensor'" in inspect.getsource(
            distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups)
        and "'torch.cuda.FloatTensor'" in inspect.getsource(clip_grads.clip_grad_by_total_norm_fp32),
        "torch_adam_steps": 's["step"].item()' in inspect.getsource(distrib_optimizer.DistributedOptimizer.state_dict),
        "fully_reshardable_bucket_offsets": "param_index_map" in inspect.getsource(
            distrib_optimizer.DistributedOptimizer.sharded_param_state_fully_reshardable)
        and "gets rid of the padding between buckets" in inspect.getsource(
            distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero),
    }
    names = [skip] if skip else list(probes) + ["uneven_gather_scatter"]
    report = {f"source:{name}": sources[name] for name in names if name in sources}
    report.update({name: outcome(probes[name]) for name in names if name in probes})
    dist.destroy_process_group()
    if "uneven_gather_scatter" in names:
        results = mp.Manager().dict()
        mp.spawn(uneven_worker, args=(free_port(), skip, results), nprocs=2, join=True)
        report["uneven_gather_scatter"] = results[0] if results[0] == results[1] else f"{results[0]}/{results[1]}"
    print(json.dumps(report))


def each(modes):
    """Run the modes in forked copies of this process, megatron-core imported (with the deferral every mode
    starts with) but no redirect applied yet, as in a fresh process."""
    import tempfile

    from megatron_medmoe.runtime import cpu_compat

    cpu_compat.import_megatron_core_deferring_compile()
    out_dir = tempfile.mkdtemp()
    children = {}
    for mode in modes:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with open(os.path.join(out_dir, mode), "w") as out:
                    sys.stdout = out
                    main("all") if mode == "all" else main("skip", mode)
                code = 0
            finally:
                # os._exit skips the exit handlers that would stop the processes this one started (the manager
                # dist_checkpointing's save starts for its writers' results): stop them, or they keep stdout open
                for child in multiprocessing.active_children():
                    child.terminate()
                os._exit(code)
        children[mode] = pid
    reports = {}
    for mode, pid in children.items():
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"probe {mode} failed (exit status {os.waitstatus_to_exitcode(status)})")
        with open(os.path.join(out_dir, mode)) as f:
            reports[mode] = json.loads(f.read().strip().splitlines()[-1])
    print(json.dumps(reports))


if __name__ == "__main__":
    if sys.argv[1] == "each":
        each(sys.argv[2:])
    else:
        main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
