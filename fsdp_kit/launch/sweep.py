"""Check every point of a Hydra sweep (``-m``) before any of them is launched, on every launcher.

Hydra composes a sweep point only when its job starts, so a bad point (``trainer.batch_size=4,0``) would be found
after the good ones ran or were submitted. This callback (registered in configs/train.yaml) composes each point
the way the launchers will and runs ``preflight``; the first bad point stops the sweep with one line
naming it, before the sweep dir exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from fsdp_kit.config import TrainConfig
from fsdp_kit.errors import ConfigError, FsdpKitError, first_line
from fsdp_kit.launch.shell import check_plain
from fsdp_kit.launch.slurm import available_partitions
from fsdp_kit.preflight import check_run_dir, preflight
from fsdp_kit.run_dir import claim


def sweep_points(config: DictConfig) -> list[list[str]]:
    """The override list of every job the sweep will launch (the basic sweeper's cross product)."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(config.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    return [point for batch in BasicSweeper.split_arguments(parser.parse_overrides(arguments), None) for point in batch]


def check_point(config: DictConfig, overrides: list[str]) -> None:
    """Compose one sweep point as its launcher will and validate it; raise FsdpKitError if it cannot work."""
    try:
        point = GlobalHydra.instance().config_loader().load_sweep_config(config, overrides)
    except (HydraException, OmegaConfBaseException) as err:  # unknown keys or options in this point
        raise ConfigError(first_line(err), "check the sweep's keys and values") from err
    launcher = point.hydra.launcher
    # The launcher decides how many ranks a job has: one process (basic), or submitit's nodes x tasks.
    world_size = int(OmegaConf.select(launcher, "nodes", default=1) or 1) * int(
        OmegaConf.select(launcher, "tasks_per_node", default=1) or 1
    )
    on_slurm = _on_slurm(launcher)
    gpus = OmegaConf.select(launcher, "gpus_per_node", default=None)
    # submitit writes the launcher's settings into an sbatch file: no value may end a line there.
    for key, value in _strings(OmegaConf.to_container(launcher, resolve=True), "hydra.launcher"):
        check_plain(value, key)
    with open_dict(point):
        # run_dir is the job's output dir, made only when the job runs; the sweep dir stands in for it.
        point.run_dir = str(point.hydra.sweep.dir)
        del point["hydra"]
    job = TrainConfig.from_hydra(point)
    # On Slurm the job runs on other machines: do not ask this one's GPU (fsdp-kit submit checks the same way).
    preflight(
        job,
        world_size=world_size,
        device_type=("cuda" if gpus else "cpu") if on_slurm else None,
        probe_device=not on_slurm,
    )


def _on_slurm(launcher: DictConfig) -> bool:
    return "slurm" in str(OmegaConf.select(launcher, "_target_", default="")).lower()


_NO_SLURM_FIX = (
    "run the sweep where Slurm answers (a login node of the cluster), or without Slurm: hydra/launcher=local"
)


def check_slurm_answers(partition: str | None = None) -> None:
    """The Slurm client is here and its controller answers (``sinfo``), and ``partition`` exists, before the
    launcher writes the sweep dir and calls ``sbatch`` (whose failure is submitit's 45-line traceback)."""
    # submitit needs srun and sbatch; sinfo asks the controller, so that "no Slurm here" is known before submitting
    missing = [tool for tool in ("sbatch", "srun", "sinfo") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"hydra/launcher=slurm needs the Slurm client, and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH: Slurm is not reachable from this "
            "machine",
            _NO_SLURM_FIX,
        )
    try:
        partitions = available_partitions()
    except ConfigError as err:
        raise ConfigError(f"Slurm is not reachable from this machine: {err.problem}", _NO_SLURM_FIX) from err
    except subprocess.TimeoutExpired as err:
        raise ConfigError(
            f"Slurm is not reachable from this machine: sinfo did not answer in {err.timeout:g} s", _NO_SLURM_FIX
        ) from err
    if partition and partitions is not None and partition not in partitions:
        raise ConfigError(
            f"hydra.launcher.partition={partition!r} does not exist on this cluster",
            f"use one of {', '.join(partitions) or '(none found)'}",
        )


def _strings(node: object, key: str) -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [found for k, v in node.items() for found in _strings(v, f"{key}.{k}")]
    if isinstance(node, list):
        return [found for i, v in enumerate(node) for found in _strings(v, f"{key}[{i}]")]
    return [(key, node)] if isinstance(node, str) else []


class CheckSweep(Callback):
    """Hydra callback: validate all sweep points at ``on_multirun_start``, before the sweeper launches any (and,
    for a single run, its run dir at ``on_run_start``)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A single run: refuse a run dir that another run is writing (or that cannot be written), and lock it
        (rank 0), before Hydra writes its own files (.hydra/, the log) into it."""
        try:
            check_run_dir(Path(config.hydra.run.dir))
            if os.environ.get("RANK", "0") == "0":  # the other ranks of a torchrun job share rank 0's lock
                claim(Path(config.hydra.run.dir))
        except FsdpKitError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(err.exit_code)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        points = sweep_points(config)
        for number, overrides in enumerate(points):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # each job warns for itself when it runs
                    check_point(config, overrides)
            except FsdpKitError as err:
                print(
                    f"error: sweep point {number} of {len(points)} ({' '.join(overrides)}): {err} "
                    "Nothing was launched.",
                    file=sys.stderr,
                )
                sys.exit(err.exit_code)
        if _on_slurm(config.hydra.launcher):  # after the points: a bad point is the user's to fix anywhere
            try:
                check_slurm_answers(OmegaConf.select(config, "hydra.launcher.partition", default=None))
            except FsdpKitError as err:
                print(f"error: {err} Nothing was launched.", file=sys.stderr)
                sys.exit(err.exit_code)
