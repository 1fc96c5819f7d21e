"""The whole job's typed configuration, composed from the owners' configs.

Each component owns its config dataclass (``policies/config.py``, ``data/config.py``, ...); this module puts
them together, registers the schema with Hydra (so a mistyped key, an unknown option or a value of the wrong
type is rejected during composition) and checks the rules that span components. Checks that need the file
system, the data, checkpoints or this machine's devices live in ``preflight.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from dataclasses import dataclass, field
from typing import cast

from hydra import compose
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, OverrideParseException
from hydra.initialize import get_gh_backup, restore_gh_from_backup
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf, ValidationError, open_dict
from omegaconf.errors import OmegaConfBaseException

from fsdp_kit.checkpoint.config import CheckpointConfig
from fsdp_kit.checks import check_finite
from fsdp_kit.config_dir import SEARCHPATH_KEY, check_folder, checked_folder, origins, user_folders
from fsdp_kit.data.config import DataConfig
from fsdp_kit.distributed import DistConfig
from fsdp_kit.env_values import keep_env_text, written
from fsdp_kit.errors import ConfigError, first_line
from fsdp_kit.launch.config import ClusterConfig, SlurmConfig
from fsdp_kit.metrics.config import MetricsConfig
from fsdp_kit.models.config import ModelConfig
from fsdp_kit.optim.config import OptimConfig
from fsdp_kit.policies.config import ActivationCheckpointConfig, PrecisionConfig, ShardingConfig, WrapConfig
from fsdp_kit.policies.sharding import check_shard_group
from fsdp_kit.run_dir import register_resolvers
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
            typed = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(cls), cfg))
            _refuse_unknown_keys(typed, "")
            # values read from the environment keep their config text, so that no file gets them resolved
            return keep_env_text(typed, OmegaConf.to_object(typed))
        except MissingMandatoryValue as err:
            raise ConfigError(f"{err.full_key} has no value", f"pass {err.full_key}=<value>") from err
        except ValidationError as err:
            raise ConfigError(f"{err.full_key}: {err.msg}", f"give {err.full_key} a valid value") from err

    def validated(self, world_size: int = 1, for_training: bool = True) -> TrainConfig:
        """Check the rules that types cannot express (ranges, combinations) at ``world_size`` ranks; raise
        ConfigError naming the problem and the fix. Touches no file, device or network.

        ``for_training=False`` (the planner) skips the rules that only matter to a run that loads data and
        evaluates, like the eval set holding one global batch."""
        check_values(self, world_size, for_training)
        return self


def _refuse_unknown_keys(node: DictConfig, prefix: str) -> None:
    """Hydra's ``+key=value`` adds a key even to a dataclass node, and ``to_object`` then drops it in silence:
    refuse keys that are not fields (free-form dict settings such as model.hf_config are checked elsewhere)."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    fields = [item.name for item in dataclasses.fields(schema)]
    for key in node:
        name = f"{prefix}{key!s}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = (
                f"did you mean {prefix}{close[0]}?"
                if close
                else f"{prefix.rstrip('.') or 'the config'} has {', '.join(fields)}"
            )
            raise ConfigError(f"{name} is not a setting ({hint})", f"drop +{name} or fix its spelling")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _refuse_unknown_keys(child, f"{name}.")


def check_ranges(job: TrainConfig) -> None:
    """Every setting finite and in its range: each component's config checks its own fields (their ``check``)."""
    for item in dataclasses.fields(job):
        value = getattr(job, item.name)
        if hasattr(value, "check"):
            value.check(f"{item.name}.")
        else:
            check_finite(value, f"{item.name}.")


def check_values(job: TrainConfig, world_size: int, for_training: bool = True) -> None:
    """Ranges and cross-component rules, before any process group, model or job exists (``for_training=False``:
    only those that also matter when planning)."""
    check_ranges(job)
    if job.trainer.warmup_steps >= job.trainer.max_steps:
        warnings.warn(
            f"trainer.warmup_steps={job.trainer.warmup_steps} >= trainer.max_steps={job.trainer.max_steps}: "
            "the learning rate never reaches its peak",
            stacklevel=3,
        )
    if for_training and job.data.eval_examples < job.trainer.batch_size * world_size:
        raise ConfigError(
            f"data.eval_examples={job.data.eval_examples} is less than one global batch "
            f"(trainer.batch_size={job.trainer.batch_size} x {world_size} ranks)",
            "raise data.eval_examples or lower trainer.batch_size",
        )
    if not job.model.pretrained:  # a pretrained model's config is a file: preflight/train check it
        from fsdp_kit.models.build import check_fits, hf_config  # late: transformers, for a preset's positions

        check_fits(hf_config(job.model), job.data, job.trainer.max_new_tokens)
    check_shard_group(job.sharding, world_size)
    _warn_precision(job)


def _warn_precision(job: TrainConfig) -> None:
    name = job.precision.name
    if name == "fp16" and "t5" in (job.model.arch + job.model.name + (job.model.pretrained or "")).lower():
        warnings.warn(
            "precision=fp16 with T5: T5's activations overflow fp16 (a known upstream issue); "
            "expect inf/nan losses. Prefer precision=bf16 on GPUs that support it.",
            stacklevel=3,
        )
    if name == "bf16_pure" and job.optim.name == "adamw":
        warnings.warn(
            "precision=bf16_pure with optim=adamw: updates smaller than a bf16 ulp are lost and "
            "training stagnates. Use optim=anyprecision (Kahan summation on).",
            stacklevel=3,
        )


def search_path_override(config_dir: str) -> str:
    """The Hydra override that adds a user's config folder (``--config-dir``); fsdp_kit searches it before the
    shipped presets (``compose_with_origins``, and ``train.main`` for the Hydra app)."""
    return f"hydra.searchpath=[file://{checked_folder(config_dir)}]"


def check_spelling(overrides: list[str]) -> None:
    """Overrides that read naturally but that the schema spells otherwise: one line naming the right spelling."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "trainer.batch_size" and value.strip().lower() == "auto":
            raise ConfigError(
                "trainer.batch_size holds a number; the batch search is trainer.auto_batch=true",
                "pass trainer.auto_batch=true (trainer.batch_size=N then only sets where a search "
                "without a planner estimate starts)",
            )


def compose_job(overrides: list[str]) -> TrainConfig:
    """The typed config that ``python -m fsdp_kit.train <overrides>`` would compose, outside a Hydra app
    (for launchers, the planner and benchmarks). ``run_dir`` defaults to outputs/unsubmitted."""
    return compose_with_origins(overrides)[0]


def compose_with_origins(overrides: list[str]) -> tuple[TrainConfig, dict[str, str]]:
    """``compose_job``, and the file each config group came from (``config_dir.origins``).

    The folders of ``hydra.searchpath=[file://DIR]`` overrides (what ``--config-dir`` becomes) are searched before
    the shipped presets, as Hydra's own ``--config-dir`` is: a user's ``DIR/model/t5_tiny.yaml`` wins."""
    check_spelling(overrides)
    folders = user_folders(overrides)
    for folder in folders:
        check_folder(folder)  # before Hydra builds anything from them
    rest = [item for item in overrides if item.partition("=")[0].strip() != SEARCHPATH_KEY]
    register_resolvers()
    search_path = create_config_search_path(f"pkg://{CONFIG_MODULE}")
    for folder in reversed(folders):
        search_path.prepend("command-line", f"file://{folder}")
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        Hydra.create_main_hydra2(task_name="app", config_search_path=search_path)
        cfg = compose("train", overrides=["run_dir=outputs/unsubmitted", *rest], return_hydra_config=True)
    except OverrideParseException as err:
        raise ConfigError(
            f"cannot parse the override {err.override!r} ({first_line(err)})",
            "quote values with spaces, '=' or brackets the Hydra way: key='a value'",
        ) from err
    except (HydraException, OmegaConfBaseException, ValueError) as err:  # unknown keys/options, bad values
        raise ConfigError(
            _innermost_message(err), "check the key and value in the override or the config file it names"
        ) from err
    finally:
        restore_gh_from_backup(backup)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    found = origins(choices, [f"file://{folder}" for folder in folders] + [f"pkg://{CONFIG_MODULE}"])
    return TrainConfig.from_hydra(cfg), found


def _innermost_message(err: BaseException) -> str:
    """Hydra wraps OmegaConf's precise message ("Invalid value 'bf8', expected one of [...]", "Value 'eight' of type
    'str' could not be converted to Integer", with its key) in a vague one, as the cause or as the context."""
    message = first_line(err).rstrip(":")
    cause = err.__cause__ or err.__context__
    while cause is not None and not getattr(cause, "full_key", None) and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and str(cause).strip():
        key = getattr(cause, "full_key", None)
        message = f"{message}: {first_line(cause)}" + (f" (key {key})" if key else "")
    return message


def register_configs() -> None:
    """Register the schema so that configs/train.yaml composes against the dataclasses."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_dict(job: TrainConfig) -> dict:
    """The resolved config as plain nested values (options as their strings), e.g. for an experiment tracker;
    values read from the environment (``${oc.env:NAME}``) stay that text (fsdp_kit/env_values.py)."""
    return OmegaConf.to_container(OmegaConf.create(written(job)), enum_to_str=True)  # type: ignore[return-value]


def to_yaml(job: TrainConfig) -> str:
    """The resolved config as YAML (for the run dir); values read from the environment stay ``${oc.env:NAME}``
    text, so a token never reaches the file."""
    return OmegaConf.to_yaml(OmegaConf.create(written(job)))


register_configs()
