"""Validate a RunConfig once, at load, and fill in the fields that are derived from others.

`resolve_config` returns the resolved config (what is printed and saved beside every run) or raises a
ConfigError listing every broken rule with the field that breaks it and what to do instead.
"""
from __future__ import annotations

import copy
import math
import os
from typing import List, Optional

from ..languages import LanguageTableError, load_registry
from ..model.placement import placement_problem
from .load import ConfigError
from .schema import RunConfig

# megatron-core's selective-recompute module names (TransformerConfig.recompute_modules)
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mlp", "moe", "shared_experts")


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Vocabulary rounded up to a multiple of `divisible_by`; independent of the parallel layout so
    that checkpoints reshard freely (the padded rows are stripped on export)."""
    return int(math.ceil(vocab_size / divisible_by) * divisible_by)


def grad_bucket_size(par) -> Optional[int]:
    """Parameters per gradient bucket of a resolved layout: None (one bucket) without overlap_grad_reduce, else
    parallel.ddp_bucket_size or megatron-core's default for the data-parallel size."""
    if not par.overlap_grad_reduce:
        return None
    return par.ddp_bucket_size or max(40_000_000, 1_000_000 * par.data)


def smallest_data_parallel(tensor: int, expert: int, expert_tensor: int) -> int:
    """The smallest data-parallel size for which the expert grid (expert_tensor x expert) tiles the
    dense grid (tensor x data) of each pipeline stage, as megatron-core requires."""
    grid = expert * expert_tensor
    return grid // math.gcd(grid, tensor)


def resolve_config(cfg: RunConfig, world_size: Optional[int] = None, check_files: bool = True) -> RunConfig:
    """Check every rule and return a copy with derived fields filled in.

    world_size: the launcher's world size (torchrun/srun/mpirun); None when `medmoe train` will start
    its own workers, in which case the world size follows from the layout.
    """
    cfg = copy.deepcopy(cfg)
    problems: List[str] = []
    m, moe, par, tr, data = cfg.model, cfg.moe, cfg.parallel, cfg.training, cfg.data

    def need(cond: bool, msg: str):
        if not cond:
            problems.append(msg)

    # --- model shape
    sizes = [f"model.{name}: must be at least 1, got {getattr(m, name)}"
             for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                          "make_vocab_size_divisible_by", "max_position_embeddings") if getattr(m, name) < 1]
    sizes += [f"parallel.{name}: must be at least 1, got {getattr(par, name)}"
              for name in ("tensor", "pipeline", "expert", "expert_tensor", "data", "virtual_pipeline")
              if getattr(par, name) is not None and getattr(par, name) < 1]
    if sizes:  # the rules below divide by these
        raise ConfigError(sizes)
    need(m.hidden_size % m.num_attention_heads == 0,
         f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_attention_heads ({m.num_attention_heads})")
    need(m.num_attention_heads % m.num_query_groups == 0,
         f"model.num_query_groups ({m.num_query_groups}) must divide model.num_attention_heads ({m.num_attention_heads})")
    need(data.seq_length >= 1, f"data.seq_length: must be at least 1, got {data.seq_length}")
    need(data.seq_length <= m.max_position_embeddings,
         f"data.seq_length ({data.seq_length}) exceeds model.max_position_embeddings ({m.max_position_embeddings})")

    # --- languages and experts
    try:
        registry = load_registry(data.language_table)
        num_experts = registry.num_experts
    except LanguageTableError as e:
        problems.append(f"data.language_table: {e}")
        num_experts = None
    need(0 <= moe.moe_last_n <= m.num_layers,
         f"moe.moe_last_n ({moe.moe_last_n}) must be between 0 and model.num_layers ({m.num_layers}): "
         "there cannot be more MoE layers than layers")
    if moe.expert_ffn_hidden_size is None:
        moe.expert_ffn_hidden_size = m.ffn_hidden_size
    if num_experts is not None and moe.moe_last_n > 0:
        need(1 <= moe.topk <= num_experts,
             f"moe.topk ({moe.topk}) must be between 1 and the number of experts ({num_experts}, from "
             f"data.language_table={data.language_table!r})")
    need(moe.routing != "hard" or moe.topk == 1,
         f"moe.topk must be 1 when moe.routing is 'hard' (each token goes to its family expert only), got {moe.topk}")
    need(moe.aux_loss_coeff >= 0 and moe.z_loss_coeff >= 0, "moe.aux_loss_coeff and moe.z_loss_coeff must be >= 0")

    # --- parallel layout
    # A layout that cannot fit the model is the one problem reported about it: the rules that combine its sizes with
    # other fields (sequence length, vocabulary, world size, batch) are skipped, as they would only repeat it while
    # naming fields that are fine.
    expert_tensor_given, data_given = par.expert_tensor is not None, par.data is not None
    if par.expert_tensor is None:
        par.expert_tensor = par.tensor
    if par.sequence_parallel is None:
        par.sequence_parallel = par.tensor > 1
    tp, pp, ep, etp = par.tensor, par.pipeline, par.expert, par.expert_tensor
    split_by_tp = [("model.num_attention_heads", m.num_attention_heads, ""),
                   ("model.num_query_groups", m.num_query_groups, ", the key/value heads"),
                   ("model.ffn_hidden_size", m.ffn_hidden_size, "")]
    if moe.shared_expert_ffn_hidden_size is not None:
        need(moe.shared_expert_ffn_hidden_size > 0,
             f"moe.shared_expert_ffn_hidden_size ({moe.shared_expert_ffn_hidden_size}) must be positive; null for no "
             "shared expert")
        if moe.shared_expert_ffn_hidden_size > 0:
            split_by_tp.append(("moe.shared_expert_ffn_hidden_size", moe.shared_expert_ffn_hidden_size, ""))
    misfits = [f"{name} ({size}{note})" for name, size, note in split_by_tp if size % tp]
    tp_fits = not misfits
    if misfits:
        common = math.gcd(*(size for _, size, _ in split_by_tp))
        fitting = [str(d) for d in range(1, common + 1) if common % d == 0]
        problems.append(f"parallel.tensor ({tp}) must divide {_listed(misfits, 'and')}: choose "
                        f"{_listed(fitting, 'or')}")
    etp_fits = ep_fits = True
    if moe.moe_last_n > 0:
        etp_fits = moe.expert_ffn_hidden_size % etp == 0
        if expert_tensor_given or tp_fits:  # else expert_tensor is the tensor size, already refused
            need(etp_fits, f"parallel.expert_tensor ({etp}) must divide moe.expert_ffn_hidden_size "
                           f"({moe.expert_ffn_hidden_size})")
        if num_experts is not None:
            if moe.expert_slots is None:
                moe.expert_slots = num_experts
            suggestion = -(-num_experts // ep) * ep
            need(moe.expert_slots >= num_experts,
                 f"moe.expert_slots ({moe.expert_slots}) must be at least the number of experts ({num_experts})")
            ep_fits = moe.expert_slots % ep == 0
            need(ep_fits,
                 f"parallel.expert ({ep}) must divide the number of experts ({moe.expert_slots}"
                 f"{' expert slots' if moe.expert_slots != num_experts else ''}, from data.language_table="
                 f"{data.language_table!r}): set moe.expert_slots={suggestion} to pad with "
                 f"{suggestion - num_experts} idle slot(s), or choose a parallel.expert that divides {num_experts}")
            if moe.expert_placement is not None:
                problem = placement_problem(moe.expert_placement, num_experts, moe.expert_slots)
                need(not problem, f"moe.expert_placement: {problem}")
            every_slot_its_expert = (moe.expert_slots == num_experts
                                     and moe.expert_placement in (None, list(range(num_experts))))
            if moe.grouped_gemm:
                need(model_transformer_engine(m.transformer_impl),
                     "moe.grouped_gemm=true needs TransformerEngine layers (model.transformer_impl auto or "
                     "transformer_engine); set it to null or false with model.transformer_impl=local")
                need(every_slot_its_expert,
                     "moe.grouped_gemm does not support padding slots or a placement yet: set moe.grouped_gemm=false "
                     "or use a parallel.expert that divides the number of experts")
            elif moe.grouped_gemm is None and not every_slot_its_expert:
                moe.grouped_gemm = False  # null = where it can: not with padding slots or a placement
        if tp > 1:
            need(par.sequence_parallel,
                 "parallel.sequence_parallel must be true when parallel.tensor > 1 and the model has MoE layers "
                 "(megatron-core requires it for MoE training)")
    else:
        ep_fits = ep == 1
        need(ep_fits, f"parallel.expert ({ep}) must be 1 for a dense model (moe.moe_last_n = 0)")
    if par.sequence_parallel:
        need(tp > 1, "parallel.sequence_parallel needs parallel.tensor > 1")
        if tp_fits:
            need(data.seq_length % tp == 0,
                 f"data.seq_length ({data.seq_length}) must be divisible by parallel.tensor ({tp}) under sequence "
                 "parallelism")
    if par.ddp_bucket_size is not None:
        need(par.overlap_grad_reduce, "parallel.ddp_bucket_size only applies with parallel.overlap_grad_reduce=true "
                                      "(without it the gradients are reduced in one piece)")
        need(par.ddp_bucket_size > 0, f"parallel.ddp_bucket_size ({par.ddp_bucket_size}) must be positive")
    if par.overlap_param_gather:
        need(par.overlap_grad_reduce, "parallel.overlap_param_gather needs parallel.overlap_grad_reduce=true (the "
                                      "weights are gathered by the gradient buckets, as in Megatron-LM)")
    chunks = pp * (par.virtual_pipeline or 1)
    pp_fits = m.num_layers % chunks == 0 and (par.virtual_pipeline is None or pp > 1)
    need(m.num_layers % chunks == 0,
         f"model.num_layers ({m.num_layers}) must be divisible by parallel.pipeline x parallel.virtual_pipeline ({chunks})")
    if par.virtual_pipeline is not None:
        need(pp > 1,
             "parallel.virtual_pipeline needs parallel.pipeline > 1 (it interleaves model chunks across stages)")
    layout_fits = tp_fits and etp_fits and ep_fits and pp_fits

    if check_files:
        _check_datasets(cfg, problems)
    if m.vocab_size is None and not problems:
        problems.append("model.vocab_size is null and there is no dataset to take it from: set model.vocab_size "
                        "or list data.datasets")
    if m.vocab_size is not None and tp_fits:
        padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by)
        need(padded % tp == 0,
             f"model.make_vocab_size_divisible_by ({m.make_vocab_size_divisible_by}) must make the padded vocabulary "
             f"({padded}) divisible by parallel.tensor ({tp})")

    min_dp = smallest_data_parallel(tp, ep, etp)
    if world_size is None:
        dp = par.data if par.data is not None else min_dp
    elif par.data is not None:
        if layout_fits:
            need(world_size == tp * pp * par.data,
                 f"world size {world_size} is not parallel.tensor x parallel.pipeline x parallel.data "
                 f"({tp} x {pp} x {par.data} = {tp * pp * par.data})")
        dp = par.data
    else:
        if layout_fits:
            need(world_size % (tp * pp) == 0,
                 f"world size {world_size} is not a multiple of parallel.tensor x parallel.pipeline ({tp} x {pp}), "
                 "so no data-parallel size fits")
        dp = max(world_size // (tp * pp), 1)
    if dp >= 1 and layout_fits:
        need((tp * dp) % (ep * etp) == 0,
             f"parallel.expert x parallel.expert_tensor ({ep} x {etp}) must divide parallel.tensor x parallel.data "
             f"({tp} x {dp}): megatron-core places experts inside the data-parallel ranks of each stage "
             f"(smallest data-parallel size for this layout: {min_dp})")
    par.data = dp

    # --- training
    need(tr.train_steps >= 0, f"training.train_steps must be >= 0, got {tr.train_steps}")
    need(tr.micro_batch_size >= 1, f"training.micro_batch_size must be at least 1, got {tr.micro_batch_size}")
    if dp >= 1 and tr.micro_batch_size >= 1 and not (layout_fits or data_given):
        # the data-parallel size was derived from a layout refused above: only the part that does not depend on it
        need(tr.global_batch_size % tr.micro_batch_size == 0 and tr.global_batch_size > 0,
             f"training.global_batch_size ({tr.global_batch_size}) must be a positive multiple of "
             f"training.micro_batch_size ({tr.micro_batch_size})")
    elif dp >= 1 and tr.micro_batch_size >= 1:
        need(tr.global_batch_size % (tr.micro_batch_size * dp) == 0 and tr.global_batch_size > 0,
             f"training.global_batch_size ({tr.global_batch_size}) must be a positive multiple of "
             f"training.micro_batch_size x parallel.data ({tr.micro_batch_size} x {dp})")
        if par.virtual_pipeline is not None and pp_fits and \
                tr.global_batch_size % (tr.micro_batch_size * dp) == 0:
            n_micro = tr.global_batch_size // (tr.micro_batch_size * dp)
            need(n_micro % pp == 0,
                 f"interleaved pipelining needs the number of micro-batches per step ({n_micro}) to be a multiple "
                 f"of parallel.pipeline ({pp}); raise training.global_batch_size")
    need(0 <= tr.min_lr <= tr.lr, f"training.min_lr ({tr.min_lr}) must be between 0 and training.lr ({tr.lr})")
    need(tr.lr_warmup_steps >= 0, "training.lr_warmup_steps must be >= 0")
    need(tr.lr_warmup_fraction is None or 0 <= tr.lr_warmup_fraction < 1,
         f"training.lr_warmup_fraction must be in [0, 1), got {tr.lr_warmup_fraction}")
    need(tr.clip_grad >= 0, "training.clip_grad must be >= 0 (0 = no clipping)")
    need(0 <= tr.adam_beta1 < 1 and 0 <= tr.adam_beta2 < 1, "training.adam_beta1/adam_beta2 must be in [0, 1)")
    need(tr.recompute_num_layers >= 1, "training.recompute_num_layers must be at least 1")
    bad_modules = [x for x in tr.recompute_modules if x not in RECOMPUTE_MODULES]
    need(not bad_modules, f"training.recompute_modules: unknown {bad_modules}; choose from {list(RECOMPUTE_MODULES)}")

    if tr.objective == "lens":
        _check_lens(cfg, dp, check_files, need)
    if cfg.fp8.format is not None:
        _check_fp8(cfg, need)
    elif cfg.fp8.pad_expert_tokens:
        problems.append("fp8.pad_expert_tokens pads expert token counts for FP8 GEMMs: it needs fp8.format")

    # --- data, logging, checkpoint
    if tr.train_steps > 0 and tr.objective == "lm":
        need(bool(data.datasets), "data.datasets: no training data (a list of {prefix: ..., weight: ...} from "
                                  "`medmoe preprocess`)")
    for i, spec in enumerate(data.datasets):
        need(spec.weight > 0, f"data.datasets[{i}].weight must be > 0, got {spec.weight}")
    need(data.temperature_alpha > 0, f"data.temperature_alpha must be > 0, got {data.temperature_alpha}")
    need(data.knowledge_priority > 0 and data.other_priority > 0, "data.knowledge_priority and data.other_priority "
                                                                  "must be > 0")
    need(data.knowledge_epochs >= 0 and data.other_epochs >= 0 and data.knowledge_epochs + data.other_epochs > 0,
         "data.knowledge_epochs and data.other_epochs must be >= 0, and not both 0")
    need(0 <= data.validation_fraction < 1, f"data.validation_fraction must be in [0, 1), got {data.validation_fraction}")
    has_validation = bool(data.validation) or data.validation_fraction > 0
    if tr.eval_interval is not None:
        need(tr.eval_interval >= 1, f"training.eval_interval must be at least 1 (or null), got {tr.eval_interval}")
        need(has_validation, "training.eval_interval: there is no validation data: list held-out datasets in "
                             "data.validation or hold out a share of the training data with data.validation_fraction")
    need(tr.eval_iters >= 1, f"training.eval_iters must be at least 1, got {tr.eval_iters}")
    if tr.mcq_eval_interval is not None:
        need(tr.mcq_eval_interval >= 1, f"training.mcq_eval_interval must be at least 1 (or null), got "
                                        f"{tr.mcq_eval_interval}")
        need(bool(data.mcq_dev), "training.mcq_eval_interval: there are no dev questions: list question files in "
                                 "data.mcq_dev")
    need(tr.mcq_shots >= 0, f"training.mcq_shots must be 0 or more, got {tr.mcq_shots}")
    if check_files:
        for i, path in enumerate(data.mcq_dev):
            need(os.path.isfile(path), f"data.mcq_dev[{i}]: no such question file {path!r}")
    if data.mcq_dev and tr.objective == "lens":
        problems.append("data.mcq_dev: the dev-set accuracy is measured by language-model training "
                        "(training.objective=lm)")
    if has_validation and tr.objective == "lens":
        problems.append("data.validation / data.validation_fraction: validation loss is measured by language-model "
                        "training (training.objective=lm); Lens reports its own losses")
    need(cfg.logging.log_interval >= 1, "logging.log_interval must be at least 1")
    if cfg.checkpoint.save_interval is not None:
        need(cfg.checkpoint.save_interval >= 1, "checkpoint.save_interval must be at least 1")
    if check_files and cfg.checkpoint.load is not None:
        need(os.path.isdir(cfg.checkpoint.load), f"checkpoint.load: {cfg.checkpoint.load!r} is not a directory")

    if problems:
        raise ConfigError(problems)
    return cfg


def _check_lens(cfg: RunConfig, dp: int, check_files: bool, need) -> None:
    lens, par = cfg.lens, cfg.parallel
    need(par.tensor == par.pipeline == par.expert == 1 and dp == 1,
         f"training.objective=lens runs in one process: parallel.tensor, pipeline, expert and data must be 1 (got "
         f"{par.tensor}, {par.pipeline}, {par.expert}, {dp})")
    need(bool(lens.parallel_data), "lens.parallel_data: the parallel JSONL file Lens probes and trains on is not set")
    if check_files and lens.parallel_data:
        need(os.path.isfile(lens.parallel_data), f"lens.parallel_data: no such file {lens.parallel_data!r}")
    need(1 <= lens.trainable_layers <= cfg.model.num_layers,
         f"lens.trainable_layers ({lens.trainable_layers}) must be between 1 and model.num_layers "
         f"({cfg.model.num_layers})")
    need(lens.probe_items >= 1, f"lens.probe_items must be at least 1, got {lens.probe_items}")
    need(lens.anchor not in lens.languages, f"lens.languages must not contain the anchor {lens.anchor!r}")


def _listed(items: List[str], last: str) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def _summary_vocab_size(prefix: str) -> int:
    """The vocabulary of the tokenizer a dataset was preprocessed with, from its summary PREFIX.json; ValueError
    naming the file when the summary does not say."""
    from ..data.dataset import PreprocessedDataset

    path = prefix + ".json"
    vocab = PreprocessedDataset.summary_of(prefix).get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise ValueError(f"{path} records no vocab_size (a positive integer): it is not a `medmoe preprocess` "
                         "summary; preprocess the dataset again")
    return vocab


def dataset_vocab_size(cfg: RunConfig) -> Optional[int]:
    """The vocabulary of the tokenizer the first dataset was preprocessed with (from its summary), if it exists;
    ConfigError when its summary does not say."""
    datasets = cfg.data.datasets
    if not datasets or not os.path.isfile(datasets[0].prefix + ".json"):
        return None
    try:
        return _summary_vocab_size(datasets[0].prefix)
    except ValueError as e:
        raise ConfigError([f"data.datasets[0].prefix: {e}"]) from e


def _check_datasets(cfg: RunConfig, problems: List[str]) -> None:
    """Every dataset is preprocessed, and a model.vocab_size that is set holds every token id the datasets use
    (null takes the first dataset's): refused here, before any worker starts, not when the workers open the data."""
    m = cfg.model
    given = m.vocab_size
    listed = [(f"data.datasets[{i}]", spec) for i, spec in enumerate(cfg.data.datasets)]
    listed += [(f"data.validation[{i}]", spec) for i, spec in enumerate(cfg.data.validation)]
    for name, spec in listed:
        if not os.path.isfile(spec.prefix + ".json"):
            problems.append(f"{name}.prefix: {spec.prefix!r} is not a preprocessed dataset "
                            f"(no {spec.prefix}.json): run `medmoe preprocess --output-prefix {spec.prefix} ...` first")
            continue
        try:
            vocab = _summary_vocab_size(spec.prefix)
        except ValueError as e:
            problems.append(f"{name}.prefix: {e}")
            continue
        if m.vocab_size is None:
            m.vocab_size = vocab
        elif given is not None and vocab > given:
            problems.append(f"model.vocab_size ({given}) is below the vocabulary of {name} "
                            f"{spec.prefix!r} ({vocab} token ids, from {spec.prefix}.json): set model.vocab_size to "
                            f"at least {vocab}, or null to take it from the datasets")


def model_transformer_engine(impl: str) -> bool:
    """Whether model.transformer_impl allows TransformerEngine layers (whether this machine has them is
    checked when a run starts, model/backend.py)."""
    return impl != "local"


def _check_fp8(cfg: RunConfig, need) -> None:
    f8, m, moe = cfg.fp8, cfg.model, cfg.moe
    need(cfg.training.precision == "bf16",
         f"fp8.format={f8.format} needs training.precision=bf16 (FP8 GEMMs inside a bf16 model), got "
         f"{cfg.training.precision}")
    need(model_transformer_engine(m.transformer_impl),
         f"fp8.format={f8.format} needs TransformerEngine layers: model.transformer_impl must be auto or "
         "transformer_engine, not local")
    bf16_layers = f8.bf16_first_layers + f8.bf16_last_layers
    need(f8.bf16_first_layers >= 0 and f8.bf16_last_layers >= 0,
         "fp8.bf16_first_layers and fp8.bf16_last_layers must be >= 0")
    if bf16_layers > 0:
        need(f8.recipe != "delayed",
             "fp8.bf16_first_layers / bf16_last_layers cannot be used with fp8.recipe=delayed (megatron-core's "
             "delayed scaling wraps the whole block in one FP8 context): use recipe tensorwise or blockwise")
        per_stage = m.num_layers // cfg.parallel.pipeline
        need(max(f8.bf16_first_layers, f8.bf16_last_layers) <= per_stage,
             f"fp8.bf16_first_layers ({f8.bf16_first_layers}) and fp8.bf16_last_layers ({f8.bf16_last_layers}) can "
             f"each be at most the layers of one pipeline stage ({per_stage})")
        need(bf16_layers < m.num_layers,
             f"fp8.bf16_first_layers + fp8.bf16_last_layers ({bf16_layers}) leaves no layer in FP8 "
             f"(model.num_layers = {m.num_layers}): train in bf16 by removing fp8.format")
    need(f8.amax_history_len >= 1, f"fp8.amax_history_len must be at least 1, got {f8.amax_history_len}")
    need(f8.margin >= 0, f"fp8.margin must be >= 0, got {f8.margin}")
    if moe.moe_last_n > 0:
        if f8.pad_expert_tokens is None:
            f8.pad_expert_tokens = moe.token_dispatcher == "alltoall"
        need(not f8.pad_expert_tokens or moe.token_dispatcher == "alltoall",
             "fp8.pad_expert_tokens needs moe.token_dispatcher=alltoall (the allgather dispatcher cannot pad): set "
             "fp8.pad_expert_tokens=false (the experts then pad for themselves) or use alltoall")
    else:
        f8.pad_expert_tokens = False


def world_size_of(cfg: RunConfig) -> int:
    """Processes a resolved config needs."""
    return cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.data
