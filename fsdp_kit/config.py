"""Typed configuration for a training job.

Every field has a docstring; Hydra composes ``configs/train.yaml`` against these dataclasses, so a
mistyped key or a value of the wrong type is rejected during composition. ``TrainConfig.validated()``
then checks what types cannot express, before any process group, model or job is created.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf, ValidationError

from fsdp_kit.errors import ConfigError, first_line

PRECISIONS = ("fp32", "bf16", "fp16", "bf16_pure")
SHARDING_STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard")
WRAP_POLICIES = ("transformer", "size", "none")
AC_MODES = ("none", "full", "every_n")
OPTIMIZERS = ("adamw", "anyprecision")
DATA_SOURCES = ("builtin", "synthetic", "csv", "jsonl", "hf")
LR_SCHEDULES = ("cosine", "linear", "constant")
OPTIM_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    name: str = "t5_tiny"
    """Preset name (display and run naming only)."""
    arch: str = "t5"
    """HF ``model_type`` used to build a random-init model from ``hf_config`` (ignored with ``pretrained``)."""
    hf_config: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the HF config class, e.g. the T5 shape (d_model, d_ff, num_layers, ...)."""
    pretrained: str | None = None
    """HF hub name or local folder to start from real weights; overrides ``arch``/``hf_config``."""
    dropout: float | None = None
    """Dropout probability for every dropout the model has; null keeps the preset's. 0 makes runs
    comparable across world sizes."""
    trust_remote_code: bool = False
    """Allow ``pretrained`` to run code from the hub. Off by default: remote code runs as you."""


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    """fp32 | bf16 (bf16 compute, fp32 weights and reductions) | fp16 (same with a gradient scaler) |
    bf16_pure (weights, grads and compute in bf16; pair with optim=anyprecision)."""


@dataclass
class ShardingConfig:
    strategy: str = "full_shard"
    """full_shard | shard_grad_op (ZeRO-2) | hybrid_shard | hybrid_shard_zero2 | no_shard (replicate, DDP-like)."""
    shard_group_size: int | None = None
    """Ranks per shard group for the hybrid strategies; null means the ranks of one node."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer states in pinned CPU memory."""


@dataclass
class WrapConfig:
    policy: str = "transformer"
    """transformer (each layer of ``layer_cls`` is its own FSDP unit) | size (group modules bottom-up
    until ``min_num_params``) | none (one unit: the whole model)."""
    layer_cls: list[str] | None = None
    """Class names of the layers to wrap, e.g. [T5Block]; null takes the model's ``_no_split_modules``."""
    min_num_params: int = 100_000_000
    """Size policy: smallest parameter count of a unit."""


@dataclass
class ActivationCheckpointConfig:
    mode: str = "none"
    """none | full (checkpoint every transformer layer) | every_n (checkpoint every ``every_n``-th layer)."""
    every_n: int = 2
    """With mode=every_n: checkpoint one layer in this many."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw (torch.optim.AdamW) | anyprecision (fsdp_kit.optim.AnyPrecisionAdamW)."""
    lr: float = 1e-3
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    fused: bool | None = None
    """torch AdamW: use the fused kernel (GPU); null lets torch choose."""
    use_kahan_summation: bool = False
    """AnyPrecision: Kahan-compensated parameter updates (keeps tiny bf16 updates)."""
    momentum_dtype: str = "float32"
    """AnyPrecision: dtype of the first moment."""
    variance_dtype: str = "bfloat16"
    """AnyPrecision: dtype of the second moment."""
    compensation_buffer_dtype: str = "bfloat16"
    """AnyPrecision: dtype of the Kahan compensation buffer."""
    chunk_elements: int = 128 * 1024 * 1024
    """AnyPrecision: elements per multi-tensor call. Bounds the optimizer's temporaries (about one chunk
    in fp32); smaller saves memory, larger means fewer kernel launches. Never changes the result."""


@dataclass
class DataConfig:
    source: str = "builtin"
    """builtin (offline task generated from ``seed``) | synthetic (random fixed-length tokens, for speed
    runs) | csv | jsonl | hf (a HF dataset by name; needs network and the ``datasets`` package)."""
    path: str | None = None
    """csv/jsonl: file to read."""
    source_column: str = "text"
    """Column holding the input text (wikihow layout: text)."""
    target_column: str = "headline"
    """Column holding the target text (wikihow layout: headline)."""
    hf_name: str | None = None
    """hf: dataset name on the hub."""
    hf_config_name: str | None = None
    """hf: dataset configuration name."""
    hf_split: str = "train"
    """hf: split to train on."""
    source_prefix: str = ""
    """Text put before every source, e.g. 'summarize: ' for T5 checkpoints."""
    tokenizer: str = "byt5"
    """byt5 (byte-level, offline, no files) or a HF tokenizer name/path."""
    max_source_len: int = 128
    """Source tokens kept per example (truncation)."""
    max_target_len: int = 32
    """Target tokens kept per example (truncation)."""
    pad_to_max_length: bool = False
    """Pad every batch to the max lengths (fixed shapes); otherwise to the batch's longest, rounded to 8."""
    num_examples: int = 20_000
    """builtin/synthetic: number of training examples."""
    eval_examples: int = 256
    """Held-out examples (the last ones of the file, or freshly generated for builtin)."""
    seed: int = 0
    """Seed of the built-in task and of the shuffling order."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""


@dataclass
class TrainerConfig:
    batch_size: int = 16
    """Per-GPU (per-rank) micro-batch size."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 500
    """Optimizer steps to train."""
    lr_schedule: str = "cosine"
    """cosine | linear | constant, each after a linear warmup."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """cosine: final learning rate as a fraction of the peak."""
    clip_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null disables clipping."""
    log_every: int = 10
    """Log metrics every this many steps."""
    eval_every: int = 100
    """Evaluate the held-out loss every this many steps (and at the end); 0 only at the end."""
    eval_batches: int = 8
    """Batches per rank for the eval loss."""
    eval_generate: bool = True
    """At the end, generate on the held-out split and report exact-match accuracy."""
    max_new_tokens: int | None = None
    """Generation length limit; null uses data.max_target_len."""
    compile: bool = False
    """torch.compile each transformer layer."""
    seed: int = 0
    """Seed for weight init and dropout."""


@dataclass
class MetricsConfig:
    peak_tflops: float | None = None
    """Dense peak TFLOPS of one device for MFU; null looks it up (unknown devices report no MFU)."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to <run_dir>/tensorboard (needs the [tensorboard] extra)."""
    progress: bool = True
    """Live progress bar on rank 0 (a line per log step when the output is not a terminal)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (0: only at the end, if ``at_end``)."""
    at_end: bool = True
    """Save when training finishes."""
    keep: int = 2
    """Complete checkpoints to keep (older ones are deleted after a newer one is committed)."""
    resume: str = "auto"
    """auto (newest complete checkpoint in the run dir, if any) | never | a checkpoint folder."""
    async_save: bool = False
    """Overlap saving with training (torch.distributed.checkpoint.async_save)."""


@dataclass
class DistConfig:
    backend: str | None = None
    """null picks nccl on GPU, gloo on CPU."""
    timeout_s: int = 600
    """Collective timeout."""


@dataclass
class ClusterConfig:
    name: str = "local"
    """Preset name: local (this machine, CPU), p4d, p4de, p5, h100, h200, or your own YAML in configs/cluster/."""
    instance_type: str | None = None
    """Cloud instance type, for the record (p4d.24xlarge, p5.48xlarge)."""
    nodes: int = 1
    """Nodes the job uses."""
    gpus_per_node: int = 0
    """GPUs one node has; 0 for a CPU-only machine."""
    gpu: str | None = None
    """GPU model, e.g. A100-SXM4-40GB."""
    gpu_memory_gb: float | None = None
    """Memory of one GPU in GB."""
    peak_tflops: float | None = None
    """Dense bf16 peak of one GPU, TFLOPS."""
    intra_node_gbps: float | None = None
    """GPU-to-GPU bandwidth inside a node (NVLink), GB/s per GPU."""
    inter_node_gbps: float | None = None
    """Network bandwidth between nodes (EFA), Gb/s per node."""
    efa: bool = False
    """The nodes talk over AWS EFA (sets the libfabric/NCCL environment in sbatch files)."""
    cpus_per_node: int | None = None
    """CPU cores (vCPUs) per node."""


@dataclass
class SlurmConfig:
    partition: str | None = None
    """Partition (queue) to submit to; null uses the cluster's default."""
    account: str | None = None
    """Slurm account to charge; null for none."""
    time: str = "04:00:00"
    """Time limit (HH:MM:SS or D-HH:MM:SS)."""
    job_name: str | None = None
    """Job name; null gives fsdp-<model name>."""
    procs_per_node: int | None = None
    """Training processes per node; null gives one per GPU (cluster.gpus_per_node), or 1 on CPU."""
    cpus_per_task: int | None = None
    """CPU cores for each node's task (sbatch) or each process (submit); null leaves Slurm's default."""
    exclusive: bool = True
    """Whole nodes only (no other jobs on them)."""
    setup: str = "source .venv/bin/activate"
    """Shell line that makes fsdp_kit importable on the nodes (venv, conda, module load, container)."""
    output_root: str = "outputs/slurm"
    """Run dirs go to <output_root>/<job name>-<job id> (the same after a requeue, so training resumes)."""
    log_dir: str = "logs/slurm"
    """Where Slurm/submitit write job logs."""
    signal_before_s: int = 90
    """Send SIGUSR2 this many seconds before the time limit: the trainer saves and the job requeues."""
    requeue: bool = True
    """Let the job be requeued after preemption or a timeout save."""
    max_requeues: int = 10
    """submit: give up after this many preemptions/timeouts."""
    rdzv_port: int = 29500
    """Port of torchrun's c10d rendezvous on the first compute node."""
    nccl_debug: bool = False
    """Export NCCL_DEBUG=INFO (for debugging hangs)."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """What to train."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Mixed-precision recipe."""
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    """How parameters, gradients and optimizer states are sharded."""
    wrap: WrapConfig = field(default_factory=WrapConfig)
    """Which submodules become their own FSDP unit."""
    ac: ActivationCheckpointConfig = field(default_factory=ActivationCheckpointConfig)
    """Activation checkpointing."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and eval data."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The loop: batch, steps, schedule, cadence."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """What is reported and where."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Process group."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """The machines (for Slurm files, submission and the planner)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Slurm job settings (fsdp-kit slurm / fsdp-kit submit)."""
    run_dir: str = "outputs/manual"
    """Where metrics, the config dump and checkpoints go; Hydra sets it to its output dir."""

    @classmethod
    def from_hydra(cls, cfg: DictConfig) -> TrainConfig:
        """Turn a composed Hydra config into typed dataclasses (resolving interpolations)."""
        try:
            typed = OmegaConf.merge(OmegaConf.structured(cls), cfg)
            return OmegaConf.to_object(typed)  # type: ignore[return-value]
        except MissingMandatoryValue as err:
            raise ConfigError(f"{err.full_key} has no value", f"pass {err.full_key}=<value>") from None
        except ValidationError as err:
            raise ConfigError(f"{err.full_key}: {err.msg}", f"give {err.full_key} a valid value") from None

    def validated(self, world_size: int | None = None, device_type: str | None = None, probe_device: bool = True,
                  check_files: bool = True) -> TrainConfig:
        """Check what types cannot express; raise ConfigError naming the problem and the fix.

        ``probe_device=False`` skips asking this machine's GPU (the job runs elsewhere); ``check_files=False``
        skips data and checkpoint paths that only the job's machines can see."""
        validate(self, world_size, device_type, probe_device, check_files)
        return self


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}", f"set {key} to one of them")


def _positive(value: int | float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}", f"pass {key}=<a number {bound}>")


def validate(job: TrainConfig, world_size: int | None = None, device_type: str | None = None,
             probe_device: bool = True, check_files: bool = True) -> None:
    """All checks that need no process group, no data read beyond a header and no model memory."""
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    _one_of(job.precision.name, PRECISIONS, "precision.name")
    _one_of(job.sharding.strategy, SHARDING_STRATEGIES, "sharding.strategy")
    _one_of(job.wrap.policy, WRAP_POLICIES, "wrap.policy")
    _one_of(job.ac.mode, AC_MODES, "ac.mode")
    _one_of(job.optim.name, OPTIMIZERS, "optim.name")
    _one_of(job.data.source, DATA_SOURCES, "data.source")
    _one_of(job.trainer.lr_schedule, LR_SCHEDULES, "trainer.lr_schedule")
    for key in ("momentum_dtype", "variance_dtype", "compensation_buffer_dtype"):
        _one_of(getattr(job.optim, key), OPTIM_DTYPES, f"optim.{key}")
    for key in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_batches"):
        _positive(getattr(job.trainer, key), f"trainer.{key}")
    for key in ("warmup_steps", "eval_every"):
        _positive(getattr(job.trainer, key), f"trainer.{key}", allow_zero=True)
    for key in ("max_source_len", "max_target_len", "num_examples", "eval_examples"):
        _positive(getattr(job.data, key), f"data.{key}")
    _positive(job.wrap.min_num_params, "wrap.min_num_params")
    _positive(job.ac.every_n, "ac.every_n")
    _positive(job.checkpoint.keep, "checkpoint.keep")
    _positive(job.checkpoint.every, "checkpoint.every", allow_zero=True)
    _positive(job.optim.lr, "optim.lr")
    _positive(job.optim.chunk_elements, "optim.chunk_elements")
    if job.optim.name == "anyprecision" and job.optim.variance_dtype == "float16":
        raise ConfigError("optim.variance_dtype=float16: the second moment (~gradient^2) underflows float16 "
                          "(gradients below about 5e-3 give 0) and the update m/eps blows up",
                          "use optim.variance_dtype=bfloat16 (same size, float32's range) or float32")
    if len(job.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in job.optim.betas):
        raise ConfigError(f"optim.betas={job.optim.betas} must be two numbers in [0, 1)",
                          "pass e.g. optim.betas=[0.9,0.999]")
    if job.model.dropout is not None and not 0.0 <= job.model.dropout < 1.0:
        raise ConfigError(f"model.dropout={job.model.dropout} must be in [0, 1)", "pass e.g. model.dropout=0.1")
    if job.metrics.peak_tflops is not None:
        _positive(job.metrics.peak_tflops, "metrics.peak_tflops")
    if job.trainer.warmup_steps >= job.trainer.max_steps:
        warnings.warn(f"trainer.warmup_steps={job.trainer.warmup_steps} >= trainer.max_steps={job.trainer.max_steps}: "
                      "the learning rate never reaches its peak", stacklevel=2)
    if job.data.eval_examples < job.trainer.batch_size * world_size:
        raise ConfigError(
            f"data.eval_examples={job.data.eval_examples} is less than one global batch "
            f"(trainer.batch_size={job.trainer.batch_size} x {world_size} ranks)",
            "raise data.eval_examples or lower trainer.batch_size")
    _validate_precision(job, device_type if probe_device else None)
    _validate_sharding(job, world_size)
    if check_files:
        _validate_data(job)
    if job.metrics.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("metrics.tensorboard=true needs the tensorboard package",
                              "pip install 'fsdp_kit[tensorboard]' or set metrics.tensorboard=false") from None
    if check_files:
        _validate_resume(job)


def _validate_precision(job: TrainConfig, device_type: str | None) -> None:
    name = job.precision.name
    if name in ("bf16", "bf16_pure") and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision={name} needs bf16, which {torch.cuda.get_device_name()} does not support",
                          "use precision=fp16 (with its gradient scaler) or precision=fp32")
    if name == "fp16" and "t5" in (job.model.arch + job.model.name + (job.model.pretrained or "")).lower():
        warnings.warn("precision=fp16 with T5: T5's activations overflow fp16 (a known upstream issue); "
                      "expect inf/nan losses. Prefer precision=bf16 on GPUs that support it.", stacklevel=2)
    if name == "bf16_pure" and job.optim.name == "adamw":
        warnings.warn("precision=bf16_pure with optim=adamw: updates smaller than a bf16 ulp are lost and "
                      "training stagnates. Use optim=anyprecision (Kahan summation on).", stacklevel=2)


def _validate_sharding(job: TrainConfig, world_size: int) -> None:
    strategy = job.sharding.strategy
    size = job.sharding.shard_group_size
    if size is None:
        return
    _positive(size, "sharding.shard_group_size")
    if not strategy.startswith("hybrid"):
        raise ConfigError(f"sharding.shard_group_size={size} only applies to hybrid strategies, not {strategy}",
                          "drop sharding.shard_group_size or use sharding=hybrid_shard")
    if world_size % size:
        raise ConfigError(
            f"world size {world_size} is not divisible by sharding.shard_group_size={size}",
            f"choose a shard_group_size that divides {world_size} (usually the GPUs per node)")


def _validate_resume(job: TrainConfig) -> None:
    from fsdp_kit.checkpoint.manager import complete_checkpoints, read_marker

    resume = job.checkpoint.resume
    existing = complete_checkpoints(Path(job.run_dir) / "checkpoints")
    if resume == "never" and existing:
        raise ConfigError(f"{existing[-1].parent} already holds checkpoints and checkpoint.resume=never would "
                          "overwrite them",
                          "use checkpoint.resume=auto to continue, or a new run dir (hydra.run.dir=...)")
    if resume not in ("auto", "never"):
        read_marker(Path(resume))  # raises CheckpointError naming what is missing or corrupt


def _validate_data(job: TrainConfig) -> None:
    # Deferred import: the data package imports tokenizers, which config users need not pay for.
    from fsdp_kit.data.sources import check_source

    check_source(job.data)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def compose_job(overrides: list[str]) -> TrainConfig:
    """The typed config that ``python -m fsdp_kit.train <overrides>`` would compose, outside a Hydra app
    (for launchers, the planner and benchmarks). ``run_dir`` defaults to outputs/unsubmitted."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from fsdp_kit.run_dir import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose("train", overrides=["run_dir=outputs/unsubmitted", *overrides])
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse the override {err.override!r} ({first_line(err)})",
                          "quote values with spaces, '=' or brackets the Hydra way: key='a value'") from None
    except (HydraException, OmegaConfBaseException, ValueError) as err:  # unknown keys/options, bad values
        raise ConfigError(first_line(err), "check the override's key and value") from None
    return TrainConfig.from_hydra(cfg)


def register_configs() -> None:
    """Register the schema so that configs/train.yaml composes against the dataclasses."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_yaml(job: TrainConfig) -> str:
    """The resolved config as YAML (for the run dir); holds no secrets since none are config fields."""
    return OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(job)))


register_configs()
