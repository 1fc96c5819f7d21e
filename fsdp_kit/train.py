"""Hydra entry point: ``python -m fsdp_kit.train [overrides]`` (also ``fsdp-kit train``, and under torchrun).

Config -> validation -> meta-device model -> process group -> policies (AC -> compile -> FSDP) ->
weights into the local shards -> optimizer -> data -> Trainer.fit().

torch, transformers and the training code are imported by ``run``, not with this module: a command line that
Hydra or the config refuses is refused without them (they take seconds to import).
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.markup import escape

from fsdp_kit import distributed
from fsdp_kit.checkpoint.preemption import EXIT_REQUEUE, PREEMPTED_MARKER
from fsdp_kit.config import TrainConfig, check_ranges, check_spelling, to_dict, to_yaml
from fsdp_kit.config_dir import SHIPPED, describe, folder_first, origins, search_first
from fsdp_kit.errors import ConfigError, FsdpKitError, one_line_warnings, report_error
from fsdp_kit.policies.config import CheckpointMode
from fsdp_kit.run_dir import RunLock, claimed_lock, register_resolvers, release_claim

if TYPE_CHECKING:
    from rich.console import Console
    from transformers import PreTrainedModel

    from fsdp_kit.distributed import DistEnv
    from fsdp_kit.metrics.report import Reporter
    from fsdp_kit.optim.config import OptimConfig
    from fsdp_kit.policies.apply import Applied
    from fsdp_kit.policies.config import PrecisionConfig
    from fsdp_kit.training.trainer import FitResult, PrecisionCheck


def run(job: TrainConfig, console: Console | None = None, origins: dict[str, str] | None = None) -> FitResult:
    """Train ``job`` in this process (one rank of however many the launcher started); ``origins``: the file each
    config group came from, for the header."""
    from fsdp_kit.preflight import preflight  # late: this Hydra app refuses bad input without torch

    check_ranges(job)  # a bad value is refused before distributed.detect imports torch (seconds)
    runtime = distributed.detect()
    if not runtime.is_main:
        import transformers  # late: see above

        warnings.filterwarnings("ignore")  # one copy of each warning, from rank 0
        transformers.logging.set_verbosity_error()
    preflight(job, world_size=runtime.world_size, device_type=runtime.device_type)

    # What training needs, imported after the checks (a refused config costs none of it, seconds of imports):
    import torch

    from fsdp_kit.checkpoint.compat import trained_settings, training_settings
    from fsdp_kit.checkpoint.manager import CheckpointManager, RunIdentity
    from fsdp_kit.data.config import check_packing
    from fsdp_kit.data.loader import build as build_data
    from fsdp_kit.data.tokenizer import recorded_name
    from fsdp_kit.launch.requeue import request_requeue
    from fsdp_kit.metrics.flops import FlopCounter
    from fsdp_kit.metrics.report import Reporter
    from fsdp_kit.metrics.tracker import Tracker
    from fsdp_kit.models.build import build as build_model
    from fsdp_kit.models.build import check_fits, hf_config
    from fsdp_kit.optim.build import build_optimizer, build_schedule
    from fsdp_kit.plan import resolve_auto_checkpointing
    from fsdp_kit.policies.apply import Policies, check_policies
    from fsdp_kit.policies.precision import needs_grad_scaler, param_dtype
    from fsdp_kit.training.batch_size import find_batch_size
    from fsdp_kit.training.trainer import Trainer, TrainParts

    # ac=auto: the lightest checkpointing whose planned peak fits this device (fsdp_kit.plan)
    chose_ac = job.ac.mode == CheckpointMode.auto
    job = resolve_auto_checkpointing(job, runtime.world_size, runtime.local_world_size, runtime.device)

    config = hf_config(job.model)
    check_packing(job.data, config.model_type, job.model.attn_implementation)  # before the model is built
    if job.model.pretrained:  # a preset's position table was checked with the values (config.check_values)
        check_fits(config, job.data, job.trainer.max_new_tokens)
    model = build_model(job.model, device="meta", dtype=param_dtype(job.precision), config=config)
    check_policies(model, Policies.of(job))
    identity = RunIdentity.of(
        model,
        config,
        job.model.name,
        recorded_name(job.data.tokenizer),
        training_settings(job.optim, job.trainer, job.precision.name),
    )
    dataset = build_data(job.data, config)

    with distributed.session(runtime, job.dist, job.sharding) as env:
        run_dir, lock = _agreed_run_dir(job.run_dir, env.world_size, env.is_main)
        reporter = Reporter(
            run_dir,
            job.metrics,
            job.trainer.max_steps,
            enabled=env.is_main,
            console=console,
            config=to_dict(job) if job.metrics.wandb else None,
        )
        batch_search = None
        try:
            applied = shard_and_materialize(model, job, env)
            torch.manual_seed(job.trainer.seed + env.rank)  # each rank draws its own dropout masks
            optimizer = build_optimizer(model, job.optim)
            schedule = build_schedule(optimizer, job.trainer)
            if job.trainer.auto_batch:  # before the config dump, so that it records the batch found
                found = find_batch_size(job, model, optimizer, dataset, env)
                reporter.note(found.record(), found.message())
                job = replace(job, trainer=replace(job.trainer, batch_size=found.batch_size))
                batch_search = found.record()
            grad_scaler = torch.amp.GradScaler(env.device_type, enabled=needs_grad_scaler(job.precision))
            identity = replace(
                identity,
                training={
                    **identity.training,  # the batch the search found, if any
                    "trained": trained_settings(job, env.world_size),
                },
            )
            checkpoints = CheckpointManager(
                job.checkpoint,
                run_dir,
                env.rank,
                env.world_size,
                identity,
                log=reporter.info,
                timeout_s=job.dist.timeout_s,
            )
            resumed = checkpoints.check_resume()  # refused before resolved_config.yaml is written
            if env.is_main:
                _write_resolved_config(run_dir, to_yaml(job), resumed[1].get("step") if resumed else None)
            _announce(reporter, job, env, model, identity.num_params, applied, run_dir, chose_ac)
            if origins:
                reporter.info(escape(describe(origins)))
            for line in dataset.report:  # every skipped row counted, by reason
                reporter.info(line)
            parts = TrainParts(
                model=model,
                optimizer=optimizer,
                schedule=schedule,
                data=dataset,
                flops=FlopCounter(job.model, config),
                tracker=Tracker(env.device, env.world_size, job.metrics.peak_tflops, env.rank),
                reporter=reporter,
                checkpoints=checkpoints,
                grad_scaler=grad_scaler,
                precision=precision_check(precision=job.precision, optim=job.optim, model=model),
            )
            trainer = Trainer(parts, job.trainer, env)
            result = trainer.fit()
            result.batch_search = batch_search
            if result.preempted and env.is_main:
                (run_dir / PREEMPTED_MARKER).write_text(f"{trainer.state.step}\n")
                reporter.info(f"preempted: saved step {trainer.state.step}; {request_requeue()}")
            return result
        finally:
            reporter.close()
            if lock is not None:
                lock.release()


def precision_check(*, precision: PrecisionConfig, optim: OptimConfig, model: PreTrainedModel) -> PrecisionCheck:
    """The precision contract's rows this run is checked against after its first step."""
    from fsdp_kit.policies.contract import expected, keep_fp32_names  # late: torch, see run()
    from fsdp_kit.training.trainer import PrecisionCheck

    return PrecisionCheck(precision.name, expected(precision.name, optim, bool(keep_fp32_names(model))))


def _write_resolved_config(run_dir: Path, text: str, resumed_step: int | None) -> None:
    """Write this run's resolved config; an earlier, different one (what steps 1..N trained with) is kept beside it
    as ``resolved_config.step_<N>.yaml`` (``N``: the step this run resumes from) instead of being overwritten."""
    path = run_dir / "resolved_config.yaml"
    if path.is_file() and path.read_text() != text:
        label = f"step_{resumed_step}" if resumed_step is not None else time.strftime("%Y%m%d-%H%M%S")
        kept = path.with_name(f"resolved_config.{label}.yaml")
        if kept.exists():
            kept = path.with_name(f"resolved_config.{label}.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        path.rename(kept)
    path.write_text(text)


def _announce(
    reporter: Reporter,
    job: TrainConfig,
    env: DistEnv,
    model: PreTrainedModel,
    num_params: int,
    applied: Applied,
    run_dir: Path,
    chose_ac: bool = False,
) -> None:
    """The run's header line: what is trained, where, and with which recipe."""
    ac = f"{job.ac.mode}{' (chosen by ac=auto)' if chose_ac else ''}"
    reporter.info(
        f"[bold]{job.model.name}[/] {num_params / 1e6:,.1f}M params | "
        f"{env.world_size} x {env.device_type} | precision={job.precision.name} "
        f"sharding={job.sharding.strategy} wrap={job.wrap.policy} ({applied.fsdp_units} FSDP units"
        f"{f', {applied.fp32_units} kept fp32' if applied.fp32_units else ''}) "
        f"ac={ac} ({applied.checkpointed_layers} layers) compile={applied.compiled_layers} layers "
        f"optim={job.optim.name} attention={model.config._attn_implementation} | run dir {run_dir}"
    )


def shard_and_materialize(model: PreTrainedModel, job: TrainConfig, env: DistEnv) -> Applied:
    """Apply the policies to the meta-device ``model`` (AC -> compile -> FSDP) and fill its local shards."""
    from fsdp_kit.models.materialize import materialize  # late: torch, see run()
    from fsdp_kit.policies.apply import Policies, apply_policies

    applied = apply_policies(model, Policies.of(job), env.mesh)
    materialize(model, job.model, env.device, env.rank, seed=job.trainer.seed)
    return applied


def _agreed_run_dir(proposed: str, world_size: int, is_main: bool) -> tuple[Path, RunLock | None]:
    """Rank 0's run dir for everyone (ranks on different nodes may have resolved different time stamps),
    locked by rank 0; if another run holds it, every rank raises the same error."""
    import torch.distributed as dist  # late: torch, see run()

    lock, refused = None, None
    if is_main:
        Path(proposed).mkdir(parents=True, exist_ok=True)
        try:  # the lock the Hydra app took before writing its files here, else a new one
            lock = claimed_lock(Path(proposed)) or RunLock(Path(proposed)).acquire()
        except ConfigError as err:
            refused = (err.problem, err.fix)  # sent as text: exceptions with two arguments do not unpickle
    holder = [proposed, refused]
    if world_size > 1:
        dist.broadcast_object_list(holder, src=0)
    if holder[1] is not None:
        raise ConfigError(*holder[1])
    path = Path(str(holder[0]))
    if is_main:
        (path / PREEMPTED_MARKER).unlink(missing_ok=True)
    return path, lock


register_resolvers()


def main() -> None:
    """The Hydra app (``python -m fsdp_kit.train``, ``fsdp-kit train``) on ``sys.argv``; a user's config folder
    (``--config-dir DIR``) is searched before the shipped presets."""
    try:
        sys.argv[1:], folder = folder_first(sys.argv[1:])
        check_spelling(sys.argv[1:])  # Hydra's own error for these is a multi-line type mismatch
    except FsdpKitError as err:
        sys.exit(report_error(err))
    search_first(folder)
    hydra.main(config_path=f"pkg://{SHIPPED}", config_name="train", version_base=None)(task)()


def task(cfg: DictConfig) -> None:
    """Hydra's task function: one training run of the composed ``cfg``."""
    one_line_warnings()
    refused = False
    runtime = HydraConfig.get().runtime
    found = origins(runtime.choices, [f"{source.schema}://{source.path}" for source in runtime.config_sources])
    try:
        result = run(TrainConfig.from_hydra(cfg), origins=found)
    except FsdpKitError as err:
        refused = True
        sys.exit(report_error(err))
    finally:  # a refused run leaves no run dir of its own behind (Hydra wrote .hydra/ and its log there)
        release_claim(refused, _hydra_files())
    if result.preempted:
        sys.exit(EXIT_REQUEUE)


def _hydra_files() -> list[str]:
    """What Hydra writes into a run dir, relative to it: its saved configs and the job's log file."""
    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    saved = [f"{hydra_cfg.output_subdir}/{name}" for name in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    return [*(saved if hydra_cfg.output_subdir else []), f"{hydra_cfg.job.name}.log"]


if __name__ == "__main__":
    # Run the module's own main, not __main__'s copy: submitit (Hydra's Slurm/local launchers) pickles the task
    # function, and a function of an importable module is pickled by name instead of by value with its globals.
    from fsdp_kit.train import main as importable_main

    importable_main()
