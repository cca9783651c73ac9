"""The typed configuration: the only definition of every option a run has.

YAML recipes, `key=value` overrides, the resolved `run_config.yaml` and the docs all follow these
dataclasses. Field comments are the documentation (docs/configuration.md is generated from them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional


@dataclass
class ModelConfig:
    num_layers: int = 4  # decoder layers
    hidden_size: int = 64  # model width
    ffn_hidden_size: int = 176  # SwiGLU intermediate size of the dense MLP (and of each expert)
    num_attention_heads: int = 4  # query heads
    num_query_groups: int = 2  # key/value heads (grouped-query attention)
    # null: the vocabulary of the tokenizer the datasets were preprocessed with; a number must be at least that
    vocab_size: Optional[int] = None
    make_vocab_size_divisible_by: int = 128  # vocabulary padded to a multiple of this (layout-independent)
    max_position_embeddings: int = 32768  # longest sequence the rotary embedding is meant for
    rotary_base: float = 1000000.0  # rotary embedding theta (Qwen2: 1e6)
    norm_epsilon: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share input embedding and output layer (Qwen2-0.5B does)
    init_method_std: float = 0.02  # weights (and fresh routers) ~ normal(0, std)
    attention_dropout: float = 0.0  # Qwen2 trains without dropout
    hidden_dropout: float = 0.0  # dropout after attention and MLP
    # auto: TransformerEngine layers when transformer_engine imports (and a GPU is present), else local
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"


@dataclass
class MoEConfig:
    moe_last_n: int = 2  # the last N decoder layers are MoE, earlier layers dense; 0 = a dense model
    # hybrid: training forces each token's family expert into its top-k, eval is plain top-k;
    # topk: plain top-k always (no language ids); hard: only the family expert, weight 1
    routing: Literal["hybrid", "topk", "hard"] = "hybrid"
    topk: int = 2  # experts per token (k)
    expert_ffn_hidden_size: Optional[int] = None  # null: model.ffn_hidden_size (experts copy the dense MLP)
    # a Qwen2-MoE-style shared expert of this SwiGLU size in every MoE layer, scaled by sigmoid(w.x);
    # null = none (Post-MoE family models have none; set by conversions of Qwen2-MoE models that have one)
    shared_expert_ffn_hidden_size: Optional[int] = None
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"  # how tokens reach expert-parallel ranks
    # TransformerEngine grouped GEMM for a rank's experts (one kernel instead of one GEMM per expert); null: on
    # with TransformerEngine layers when every slot holds its own expert (no padding slot, no placement)
    grouped_gemm: Optional[bool] = None
    aux_loss_coeff: float = 0.0  # switch-style load-balancing loss; 0 in the released recipe
    z_loss_coeff: float = 0.0  # router z-loss; 0 = off
    # expert slots over the expert-parallel ranks; null = the number of experts. parallel.expert must divide
    # it: 7 families on 2, 4 or 8 ranks need 8 slots (one padding slot: frozen, never routed to, not saved)
    expert_slots: Optional[int] = None
    expert_placement: Optional[List[int]] = None  # the slot of each expert; null = expert i in slot i


@dataclass
class ParallelConfig:
    tensor: int = 1  # tensor-parallel size (divides heads, kv heads, ffn size, padded vocabulary)
    pipeline: int = 1  # pipeline stages (divides the layers)
    virtual_pipeline: Optional[int] = None  # model chunks per pipeline rank (interleaved 1F1B)
    expert: int = 1  # expert-parallel size (divides moe.expert_slots)
    expert_tensor: Optional[int] = None  # tensor parallelism inside experts; null: same as `tensor`
    # data-parallel size; null: the launcher's world size / (tensor x pipeline), or the smallest size
    # the expert layout allows when `medmoe train` starts its own workers
    data: Optional[int] = None
    sequence_parallel: Optional[bool] = None  # null: on whenever tensor > 1 (MoE with TP requires it)
    # gloo on CPU; nccl when GPUs are present
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # reduce the gradients bucket by bucket while the step's last micro-batch runs its backward pass, instead of
    # all at once after it (Megatron-LM's --overlap-grad-reduce)
    overlap_grad_reduce: bool = False
    # parameters per gradient bucket with overlap_grad_reduce; null: megatron-core's max(40M, 1M x data size)
    ddp_bucket_size: Optional[int] = None
    # the distributed optimizer's all-gather of the updated weights runs bucket by bucket during the next
    # step's forward pass instead of right after the step (Megatron-LM's --overlap-param-gather; GPUs, and
    # with overlap_grad_reduce)
    overlap_param_gather: bool = False


@dataclass
class TrainingConfig:
    train_steps: int = 300  # optimizer steps (global batches)
    micro_batch_size: int = 4  # rows per forward/backward pass
    global_batch_size: int = 8  # rows per optimizer step, over all data-parallel ranks
    lr: float = 3e-3  # peak learning rate (after warm-up)
    min_lr: float = 3e-4  # learning rate at the end of the decay
    lr_warmup_steps: int = 20  # linear warm-up from 0
    lr_warmup_fraction: Optional[float] = None  # warm-up as a fraction of the decay steps (e.g. 0.03); overrides lr_warmup_steps
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up
    lr_decay_steps: Optional[int] = None  # null: train_steps
    weight_decay: float = 0.1  # AdamW weight decay (not on biases and norms)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    clip_grad: float = 1.0  # global gradient-norm clip; 0 = off
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 needs GPUs
    seed: int = 1234  # weights, data order and every RNG derive from it
    recompute_granularity: Optional[Literal["full", "selective"]] = None  # activation recomputation; null = off
    recompute_method: Literal["uniform", "block"] = "uniform"  # for full recomputation
    recompute_num_layers: int = 1  # for full recomputation
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])  # for selective
    # non-finite loss or gradient: stop (naming step, rank and micro-batch) or skip the step and go on
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # stop (save, exit for requeue) this many minutes after the start; null = no wall-clock limit
    max_wall_minutes: Optional[float] = None
    # lm: next-token loss on data.datasets; lens: Lens language-subspace tuning on lens.parallel_data (one
    # process; only the top lens.trainable_layers layers train, against the frozen starting model)
    objective: Literal["lm", "lens"] = "lm"
    # validation every N steps (Megatron-LM --eval-interval), and always after the stage's last step when there is
    # validation data (data.validation or data.validation_fraction); null: only after the last step
    eval_interval: Optional[int] = None
    # global batches of validation rows per validation (Megatron-LM --eval-iters); the same rows every time, fewer
    # when the validation documents fill fewer
    eval_iters: int = 10
    # multiple-choice dev-set accuracy (data.mcq_dev) every N steps, and after the last step when data.mcq_dev is
    # set; scored by answer-letter likelihood as `medmoe eval mcq --mode loglik` does; null: only after the last step
    mcq_eval_interval: Optional[int] = None
    mcq_shots: int = 3  # few-shot examples from the same source in each dev prompt (seeded by training.seed)


@dataclass
class DatasetSpec:
    prefix: str = ""  # a `medmoe preprocess --output-prefix` (PREFIX.bin, .idx, .json, ...)
    weight: float = 1.0  # its share of the documents when data.sampling is weighted


@dataclass
class ValidationSpec:
    prefix: str = ""  # a `medmoe preprocess --output-prefix` never trained on


@dataclass
class DataConfig:
    datasets: List[DatasetSpec] = field(default_factory=list)  # preprocessed datasets to train on
    # held-out datasets for the validation loss (Megatron-LM --valid-data-path): a list of {prefix: ...}
    validation: List[ValidationSpec] = field(default_factory=list)
    # this fraction of each training dataset's documents (chosen by training.seed) is held out for validation and
    # never trained on; 0 = none (Megatron-LM --split)
    validation_fraction: float = 0.0
    # multiple-choice question files (the formats `medmoe eval mcq` reads) for a dev-set accuracy during training
    mcq_dev: List[str] = field(default_factory=list)
    # weighted: by data.datasets[].weight; apollo: ApolloMoE's priority recipe; temperature: p(language) ~ tokens^alpha
    sampling: Literal["weighted", "apollo", "temperature"] = "weighted"
    temperature_alpha: float = 0.3  # for sampling: temperature
    knowledge_sources: List[str] = field(default_factory=lambda: ["*_qa"])  # apollo: knowledge Q&A source names (globs)
    knowledge_priority: float = 16.0  # apollo: sampling priority of knowledge Q&A documents
    knowledge_epochs: int = 1  # apollo: times each knowledge Q&A document enters the pool
    other_priority: float = 2.0  # apollo: priority of everything else (exams, dialogues, general, code, math)
    other_epochs: int = 2  # apollo: times each other document enters the pool
    seq_length: int = 128  # tokens per packed row
    # whole_documents: a document that does not fit the row's rest starts the next row, the rest is padding
    # (the released recipe); continuous: concatenate and cut, no padding (megatron-core's GPT datasets)
    packing: Literal["whole_documents", "continuous"] = "whole_documents"
    # shared: packed documents attend to each other (the released recipe); per_document: each only to itself
    attention: Literal["shared", "per_document"] = "shared"
    loader: Literal["default", "dali"] = "default"  # dali: prefetch rows through an NVIDIA DALI pipeline
    language_table: str = "families"  # `families`, `languages12` or a path to your own table


@dataclass
class LoggingConfig:
    log_interval: int = 10  # steps between metric lines
    output_dir: str = "runs/tiny"  # the resolved config and the metrics log go here
    tensorboard: bool = False  # event files under OUTPUT_DIR/tensorboard
    wandb: bool = False  # Weights & Biases: offline (OUTPUT_DIR/wandb) unless WANDB_API_KEY is set
    wandb_project: str = "megatron-medmoe"
    # peak dense TFLOP/s of one device for MFU; null: the bf16 figure of a known GPU (H100, H200, A100, L40S:
    # runtime/gpus.py) in bf16 training, else no MFU
    peak_tflops: Optional[float] = None


@dataclass
class CheckpointConfig:
    # directory for torch_dist checkpoints; null = no saving. A run whose save directory already holds a
    # checkpoint resumes from its latest (model, optimizer, schedule, data position, random states)
    save: Optional[str] = None
    save_interval: Optional[int] = None  # save every N steps; the final step (and a stop) is always saved
    keep_last: Optional[int] = None  # keep only the newest N checkpoints in `save`; null = keep all
    # start from this checkpoint (a checkpoint directory or a save directory's latest) when `save` has none
    load: Optional[str] = None
    finetune: bool = False  # with `load`: take the model weights only (fresh optimizer, step 0)
    # when the latest checkpoint does not verify against its manifest (a damaged or missing file): load the
    # newest one that does, saying so, instead of stopping with an error (medmoe train --ckpt-fallback)
    fallback: bool = False
    # GPU distributed optimizer: dp_reshardable (fast; loads only under the same TP/PP/EP) or fully_reshardable
    # (loads under any layout). The CPU optimizer's state always reshards.
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"


@dataclass
class FP8Config:
    # FP8 GEMMs in the TransformerEngine layers (GPUs with FP8 tensor cores: H100, H200, L40S, B200); null = off.
    # e4m3 everywhere, or hybrid: e4m3 forward, e5m2 gradients. Needs training.precision=bf16
    format: Optional[Literal["e4m3", "hybrid"]] = None
    # scaling: delayed (amax history, megatron-core's default), tensorwise (current scaling), blockwise
    # (1x128 activations, 128x128 weights; the one recommended for MoE on Hopper)
    recipe: Literal["delayed", "tensorwise", "blockwise"] = "delayed"
    amax_history_len: int = 1024  # delayed: amax values remembered per tensor
    amax_compute_algo: Literal["max", "most_recent"] = "max"  # delayed: how the scale follows that history
    margin: int = 0  # delayed: scale down by 2^margin for headroom
    bf16_first_layers: int = 0  # keep the first N decoder layers in bf16 (not with recipe delayed)
    bf16_last_layers: int = 0  # keep the last N decoder layers in bf16 (not with recipe delayed)
    # pad each expert's token count to the FP8 GEMM alignment in the router's map (cheaper than padding in
    # the experts); null: on with moe.token_dispatcher alltoall (allgather cannot)
    pad_expert_tokens: Optional[bool] = None


@dataclass
class FusionConfig:
    # megatron-core's fused kernels, as Megatron-LM's recipes turn them on. null: on where this machine and the
    # layers can run it (a GPU; TransformerEngine layers where noted), off elsewhere; true: required (refused
    # where it cannot run); false: off
    bias_activation: Optional[bool] = None  # fused SwiGLU (Megatron-LM --bias-swiglu-fusion)
    rope: Optional[bool] = None  # TransformerEngine's fused rotary embedding (--apply-rope-fusion)
    masked_softmax: Optional[bool] = None  # fused scale-mask-softmax of the local layers' attention
    # weight gradients accumulated into the fp32 main gradients inside TransformerEngine's GEMM
    gradient_accumulation: Optional[bool] = None
    moe_permute: Optional[bool] = None  # TransformerEngine's fused token permutation of the MoE dispatcher
    cross_entropy: Optional[bool] = None  # megatron-core's fused vocab-parallel cross entropy


@dataclass
class LensConfig:
    # JSONL, one parallel item per line: {"en": "...", "zh": "...", ...}; probing and training prompts
    parallel_data: str = ""
    anchor: str = "en"  # the language kept as it was, and pulled toward
    languages: List[str] = field(default_factory=list)  # target languages; empty: all in the file but the anchor
    trainable_layers: int = 2  # only the top N decoder layers train (embeddings, final norm, output frozen)
    probe_items: int = 300  # parallel items for probing the subspaces (the first N)
    alpha: float = 1.0  # how far along its own language direction each language is pushed
    w_retain: float = 1.0  # weight of the English-retaining loss
    w_agn: float = 1.0  # weight of the pull toward English on the language-agnostic direction


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    fusions: FusionConfig = field(default_factory=FusionConfig)
    lens: LensConfig = field(default_factory=LensConfig)
