"""The whole job's typed configuration, composed from the owners' configs.

Each component owns its config dataclass (``policies/config.py``, ``data/config.py``, ...); this module puts
them together, registers the schema with Hydra (so a mistyped key, an unknown option or a value of the wrong
type is rejected during composition) and checks the rules that span components. Checks that need the file
system, the data, checkpoints or this machine's devices live in ``preflight.py``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf, ValidationError

from fsdp_kit.checkpoint.config import CheckpointConfig
from fsdp_kit.data.config import DataConfig
from fsdp_kit.distributed import DistConfig
from fsdp_kit.errors import ConfigError, first_line
from fsdp_kit.launch.config import ClusterConfig, SlurmConfig
from fsdp_kit.metrics.config import MetricsConfig
from fsdp_kit.models.config import ModelConfig
from fsdp_kit.optim.config import OptimConfig
from fsdp_kit.policies.config import ActivationCheckpointConfig, PrecisionConfig, ShardingConfig, WrapConfig
from fsdp_kit.policies.sharding import check_shard_group
from fsdp_kit.training.config import TrainerConfig

CONFIG_MODULE = "fsdp_kit.configs"
"""The shipped configs, a package inside the wheel: Hydra finds them as pkg://fsdp_kit.configs from anywhere."""


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
            raise ConfigError(f"{err.full_key} has no value", f"pass {err.full_key}=<value>") from err
        except ValidationError as err:
            raise ConfigError(f"{err.full_key}: {err.msg}", f"give {err.full_key} a valid value") from err

    def validated(self, world_size: int = 1) -> TrainConfig:
        """Check the rules that types cannot express (ranges, combinations) at ``world_size`` ranks; raise
        ConfigError naming the problem and the fix. Touches no file, device or network."""
        check_values(self, world_size)
        return self


def _positive(value: int | float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}", f"pass {key}=<a number {bound}>")


def check_values(job: TrainConfig, world_size: int) -> None:
    """Ranges and cross-component rules, before any process group, model or job exists."""
    for key in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_batches", "auto_batch_max"):
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
    if len(job.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in job.optim.betas):
        raise ConfigError(f"optim.betas={job.optim.betas} must be two numbers in [0, 1)",
                          "pass e.g. optim.betas=[0.9,0.999]")
    if job.model.dropout is not None and not 0.0 <= job.model.dropout < 1.0:
        raise ConfigError(f"model.dropout={job.model.dropout} must be in [0, 1)", "pass e.g. model.dropout=0.1")
    if job.metrics.peak_tflops is not None:
        _positive(job.metrics.peak_tflops, "metrics.peak_tflops")
    if job.trainer.warmup_steps >= job.trainer.max_steps:
        warnings.warn(f"trainer.warmup_steps={job.trainer.warmup_steps} >= trainer.max_steps={job.trainer.max_steps}: "
                      "the learning rate never reaches its peak", stacklevel=3)
    if job.data.eval_examples < job.trainer.batch_size * world_size:
        raise ConfigError(
            f"data.eval_examples={job.data.eval_examples} is less than one global batch "
            f"(trainer.batch_size={job.trainer.batch_size} x {world_size} ranks)",
            "raise data.eval_examples or lower trainer.batch_size")
    check_shard_group(job.sharding, world_size)
    _warn_precision(job)


def _warn_precision(job: TrainConfig) -> None:
    name = job.precision.name
    if name == "fp16" and "t5" in (job.model.arch + job.model.name + (job.model.pretrained or "")).lower():
        warnings.warn("precision=fp16 with T5: T5's activations overflow fp16 (a known upstream issue); "
                      "expect inf/nan losses. Prefer precision=bf16 on GPUs that support it.", stacklevel=3)
    if name == "bf16_pure" and job.optim.name == "adamw":
        warnings.warn("precision=bf16_pure with optim=adamw: updates smaller than a bf16 ulp are lost and "
                      "training stagnates. Use optim=anyprecision (Kahan summation on).", stacklevel=3)


def search_path_override(config_dir: str) -> str:
    """The Hydra override that adds a user's config folder beside the shipped ones (``--config-dir``)."""
    from pathlib import Path

    path = Path(config_dir).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"--config-dir {config_dir} is not a folder", "pass a folder holding e.g. cluster/mine.yaml")
    return f"hydra.searchpath=[file://{path}]"


def check_spelling(overrides: list[str]) -> None:
    """Overrides that read naturally but that the schema spells otherwise: one line naming the right spelling."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "trainer.batch_size" and value.strip().lower() == "auto":
            raise ConfigError("trainer.batch_size holds a number; the batch search is trainer.auto_batch=true",
                              "pass trainer.auto_batch=true (trainer.batch_size=N then only sets where a search "
                              "without a planner estimate starts)")


def compose_job(overrides: list[str]) -> TrainConfig:
    """The typed config that ``python -m fsdp_kit.train <overrides>`` would compose, outside a Hydra app
    (for launchers, the planner and benchmarks). ``run_dir`` defaults to outputs/unsubmitted."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from fsdp_kit.run_dir import register_resolvers

    check_spelling(overrides)
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            cfg = compose("train", overrides=["run_dir=outputs/unsubmitted", *overrides])
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse the override {err.override!r} ({first_line(err)})",
                          "quote values with spaces, '=' or brackets the Hydra way: key='a value'") from err
    except (HydraException, OmegaConfBaseException, ValueError) as err:  # unknown keys/options, bad values
        raise ConfigError(_innermost_message(err), "check the override's key and value") from err
    return TrainConfig.from_hydra(cfg)


def _innermost_message(err: BaseException) -> str:
    """Hydra wraps OmegaConf's precise message ("Invalid value 'bf8', expected one of [...]") in a vague one."""
    message = first_line(err)
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        key = getattr(cause, "full_key", None)
        message = f"{message}: {first_line(cause)}" + (f" (key {key})" if key else "")
    return message


def register_configs() -> None:
    """Register the schema so that configs/train.yaml composes against the dataclasses."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_yaml(job: TrainConfig) -> str:
    """The resolved config as YAML (for the run dir); holds no secrets since none are config fields."""
    return OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(job)))


register_configs()
