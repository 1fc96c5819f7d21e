"""One run directory per job, the same on every rank, stable across Slurm requeues.

Every rank composes the Hydra config on its own, so a plain time stamp could differ between ranks that
start a second apart. ``${fsdp_kit_run_id:}`` resolves to the Slurm job id when there is one (a requeued
job finds its checkpoints again), else the torchrun rendezvous id, else the start time of the launching
torchrun agent (shared by its workers), else the current time; the last two carry the launching process's
pid, so two runs started in the same second get different folders. Rank 0's choice is broadcast anyway.

A lock file makes a second writer of the same run dir (an explicit ``hydra.run.dir``) fail with one line;
a lock left by a killed run does not block resuming.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fsdp_kit.errors import ConfigError

_STAMP = "%Y-%m-%d/%H-%M-%S"


def run_id() -> str:
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        array_task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f"_{array_task}" if array_task else "")
    if env.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    if "LOCAL_RANK" in env:
        started = _process_start_time(os.getppid())
        if started is not None:  # the agent's pid, shared by its workers, tells two same-second launches apart
            return f"{started.strftime(_STAMP)}-{os.getppid()}"
    return f"{datetime.datetime.now().strftime(_STAMP)}-{os.getpid()}"


def _process_start_time(pid: int) -> datetime.datetime | None:
    """Wall-clock start of ``pid`` from /proc (Linux); None where /proc is not available."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return datetime.datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fsdp_kit_run_id"):
        OmegaConf.register_new_resolver("fsdp_kit_run_id", run_id, use_cache=True)


# -- one writer per run dir ------------------------------------------------------------------------------------
LOCK_NAME = ".fsdp_kit.lock"
# A lock written on another host is trusted while its holder keeps touching it (HEARTBEAT_S); one untouched
# for STALE_AFTER_S is from a run that died there.
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


FRESH_LOCK_S = 5.0
_BEING_WRITTEN = {"pid": "(starting)", "host": socket.gethostname(), "started": "just now"}


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _lock_owner() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def live_holder(run_dir: Path) -> dict[str, Any] | None:
    """Who holds ``run_dir``'s lock, or None when it is free or the lock is stale (a killed run)."""
    lock = Path(run_dir) / LOCK_NAME
    try:
        owner = json.loads(lock.read_text())
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Half-written: a crashed writer, nothing to protect, unless it is being written this very moment by a
        # run started at the same time (between its O_EXCL create and its write).
        return _BEING_WRITTEN if _age(lock) < FRESH_LOCK_S else None
    if not isinstance(owner, dict):
        return None
    if owner.get("slurm_job") and owner.get("slurm_job") == os.environ.get("SLURM_JOB_ID"):
        return None  # an earlier incarnation of this very Slurm job (requeued): it cannot still be running
    if owner.get("host") == socket.gethostname():
        alive = isinstance(owner.get("pid"), int) and owner["pid"] != os.getpid() and _pid_alive(owner["pid"])
        return owner if alive else None
    return owner if age < STALE_AFTER_S else None


def _locked_error(run_dir: Path, owner: dict[str, Any]) -> ConfigError:
    return ConfigError(
        f"{run_dir} is in use by another run (pid {owner.get('pid')} on {owner.get('host')}, "
        f"started {owner.get('started')}); two writers would corrupt each other's checkpoints",
        "wait for it to finish or use another run dir (hydra.run.dir=...); if that run is dead, "
        f"delete {Path(run_dir) / LOCK_NAME}",
    )


def check_unlocked(run_dir: Path) -> None:
    owner = live_holder(run_dir)
    if owner is not None:
        raise _locked_error(run_dir, owner)


class RunLock:
    """``<run_dir>/.fsdp_kit.lock``, held by rank 0 for the whole run, refreshed by a heartbeat thread."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                check_unlocked(self.path.parent)
                self.path.unlink(missing_ok=True)  # stale: its run was killed
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(_lock_owner(), handle)
            self._thread = threading.Thread(target=self._beat, name="fsdp_kit-run-lock", daemon=True)
            self._thread.start()
            return self
        raise _locked_error(self.path.parent, live_holder(self.path.parent) or {})

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


# -- the lock taken before Hydra writes into the run dir ------------------------------------------------------------
@dataclass
class Claim:
    """The run dir this process locked before Hydra wrote its files (.hydra/, the job log) there."""

    run_dir: Path
    lock: RunLock
    fresh: bool
    """The run dir did not exist or was empty: all that is in it was written by this run."""


_claim: Claim | None = None


def claim(run_dir: Path) -> Claim:
    """Lock ``run_dir`` for this process now (the Hydra callback's ``on_run_start``, before Hydra writes there):
    of two runs started at once into one run dir, the refused one writes nothing."""
    global _claim
    run_dir = Path(run_dir)
    fresh = not run_dir.exists() or not any(run_dir.iterdir())
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(run_dir).acquire()
    except ConfigError:
        if fresh:
            _remove_empty(run_dir)
        raise
    _claim = Claim(run_dir, lock, fresh)
    return _claim


def claimed_lock(run_dir: Path) -> RunLock | None:
    """The lock ``claim`` took for ``run_dir`` in this process, if any (training keeps it instead of taking a
    second one)."""
    if _claim is not None and _claim.run_dir.resolve() == Path(run_dir).resolve():
        return _claim.lock
    return None


def release_claim(refused: bool, hydra_files: list[str]) -> None:
    """The end of the Hydra app: release the claimed lock. Where the run was ``refused`` and the run dir was fresh,
    also remove what Hydra wrote there (``hydra_files``, relative names) and the run dir itself, so that a refusal
    leaves no run dir behind; whenever anything else is there (metrics, checkpoints, a file of the user's), every
    file stays."""
    global _claim
    if _claim is None:
        return
    found, _claim = _claim, None
    found.lock.release()
    if not (refused and found.fresh):
        return
    theirs = {found.run_dir / name for name in hydra_files}
    present = [path for path in found.run_dir.rglob("*") if path.is_file() or path.is_symlink()]
    if any(path not in theirs for path in present):
        return
    for path in present:
        path.unlink(missing_ok=True)
    for folder in sorted({path.parent for path in theirs}, key=lambda p: len(p.parts), reverse=True):
        _remove_empty(folder)
    _remove_empty(found.run_dir)


def _remove_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (or gone): nothing of anyone else's is removed
        folder.rmdir()
