"""Save, commit, prune and find checkpoints.

Layout: ``<run_dir>/checkpoints/step_<N>/`` holds the DCP shards, ``.metadata``, ``rng/rank_<r>.pt`` and
``fsdp_kit.json``. A save writes into ``step_<N>.partial`` and rank 0 renames it only after every rank has
finished, so a folder named ``step_<N>`` is always complete: ``kill -9`` mid-save leaves a ``.partial``
that is never read. Pruning (``keep``) removes older saves of the current timeline only after a newer one is
committed, and moves a branch left behind aside (see ``timeline``). DCP metadata is pickled: a checkpoint folder
is trusted input, like any pickle.

The marker (see ``marker``, which verifies its own bytes) records a CRC-32 of every file of the folder (verified
before loading, see ``integrity``), the checkpoint's parent, and the training settings (see ``compat``).
Saving a step that already has a checkpoint (a run resumed from an older one trains past it again) moves the
old folder aside as ``step_<N>.replaced-<time>``, never deletes it. An asynchronous save is committed by a
background thread as soon as every rank's write finished; pruning runs on a background thread of rank 0, off the
training path. ``wait()`` joins both.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from transformers import PretrainedConfig

from fsdp_kit import __version__
from fsdp_kit.checkpoint.compat import apply_settings, changed_settings, check_layout, check_trained
from fsdp_kit.checkpoint.config import CheckpointConfig
from fsdp_kit.checkpoint.failure import write_failure
from fsdp_kit.checkpoint.integrity import ALGORITHM, file_checksum, mismatches
from fsdp_kit.checkpoint.marker import MARKER, marker_text, read_marker
from fsdp_kit.checkpoint.preemption import PreemptionFlag
from fsdp_kit.checkpoint.state import TrainState, load_rng, save_rng
from fsdp_kit.checkpoint.timeline import complete_checkpoints, move_aside, next_seq, prune_plan, resume_source
from fsdp_kit.distributed import group_timeout
from fsdp_kit.errors import CheckpointError, first_line
from fsdp_kit.torch_private import CHECKPOINT_WRAPPER_PREFIX

__all__ = ["MARKER", "CheckpointManager", "RunIdentity", "complete_checkpoints", "read_marker", "verify"]
# the files one rank writes (DCP's FileSystemWriter names its shards __<rank>_<n>.distcp); the rest is rank 0's
_RANK_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rng/rank_(\d+)\.pt)$")


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint records about the model, to refuse loading into a different one and to export."""

    model_name: str
    hf_config: dict[str, Any]
    tokenizer: str
    param_shapes: dict[str, list[int]]
    training: dict[str, Any] = field(default_factory=dict)
    """``compat.training_settings``: optimizer, precision, state layout, hyperparameters, schedule."""

    @property
    def num_params(self) -> int:
        return sum(int(torch.Size(shape).numel()) for shape in self.param_shapes.values())

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        config: PretrainedConfig,
        model_name: str,
        tokenizer: str,
        training: dict[str, Any] | None = None,
    ) -> RunIdentity:
        shapes = {
            name.replace(CHECKPOINT_WRAPPER_PREFIX, ""): list(param.shape) for name, param in model.named_parameters()
        }
        return cls(model_name, config.to_dict(), tokenizer, shapes, training or {})


def verify(source: Path, meta: dict[str, Any], names: list[str] | None = None) -> list[str]:
    """Files of ``source`` (among ``names``, default all) whose recorded checksum does not match; [] for
    checkpoints written before checksums were recorded."""
    sums = meta.get("checksums")
    if not isinstance(sums, dict):
        return []
    return mismatches(source, sums, names)


def newest_verified(root: Path, exclude: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` other than ``exclude`` whose files all verify."""
    for candidate in reversed(complete_checkpoints(root)):
        if candidate == exclude:
            continue
        try:
            if not verify(candidate, read_marker(candidate)):
                return candidate
        except CheckpointError:
            continue
    return None


def corrupt_error(source: Path, bad: list[str]) -> CheckpointError:
    good = newest_verified(source.parent, source)
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    fix = (
        f"resume from {good}, the newest checkpoint that verifies (checkpoint.resume={good})"
        if good
        else "no other checkpoint in that folder verifies; start a new run dir"
    )
    return CheckpointError(f"{source} is corrupt: {bad[0]}{more}", fix)


class CheckpointManager:
    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: str | Path,
        rank: int,
        world_size: int,
        identity: RunIdentity,
        log: Callable[[str], None] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """``timeout_s``: the job's collective timeout (dist.timeout_s), for the gloo groups made here."""
        self.cfg, self.rank, self.world_size, self.identity = cfg, rank, world_size, identity
        self.root = Path(run_dir) / "checkpoints"
        self.timeout_s = timeout_s
        self.flag = PreemptionFlag(world_size, timeout_s)
        self._log = log or (lambda message: None)
        self._async_group = None
        self._restored: Path | None = None
        # the timeline (fsdp_kit.checkpoint.timeline): what the next save continues from, and the explicit
        # checkpoint.resume its timeline started from
        self._parent: Path | None = None
        self._request: str | None = None
        self._why = ""
        self._changes: list[str] = []
        # the background commit (async saves, every rank) or pruning (rank 0) of the last save
        self._worker: threading.Thread | None = None
        self._worker_error: BaseException | None = None

    # -- restore -----------------------------------------------------------------------------------
    def check_resume(self) -> tuple[Path, dict[str, Any]] | None:
        """The checkpoint a restore would load and its marker, after the checks that load nothing (model
        shapes, optimizer/precision layout): run before the run dir is written to, so that a refused resume
        leaves the run's resolved_config.yaml as it was."""
        found = resume_source(self.cfg.resume, self.root)
        if found is None:
            return None
        source, self._why, self._request = found.path, found.why, found.request
        meta = read_marker(source)
        self._check_identity(source, meta)
        if self.identity.training:
            saved = meta.get("training") or {}
            check_layout(source, saved, self.identity.training)
            self._changes = check_trained(
                source, saved.get("trained"), self.identity.training.get("trained", {}), self.cfg.allow_changes
            )
        return source, meta

    def restore(self, state: TrainState) -> Path | None:
        found = self.check_resume()
        if found is None:
            return None
        source, meta = found
        self._verify(source, meta)
        try:
            payload = state.state_dict()
            dcp.load(payload, checkpoint_id=str(source))
        except (Exception, CheckpointException) as err:  # DCP raises many types for damaged shards
            raise CheckpointError(
                f"loading {source} failed ({type(err).__name__}: {first_line(err)})",
                "the shards are damaged or incomplete; resume from another checkpoint",
            ) from err
        state.load_state_dict(payload)
        try:
            load_rng(source / "rng" / f"rank_{self.rank}.pt")
        except Exception as err:  # torch.load raises many types for a damaged file
            raise CheckpointError(
                f"the random-generator state {source / 'rng' / f'rank_{self.rank}.pt'} is "
                f"unreadable ({type(err).__name__}: {first_line(err)})",
                "resume from another checkpoint; this one is left as it is",
            ) from err
        if self.identity.training:
            changes = changed_settings(meta.get("training") or {}, self.identity.training)
            apply_settings(state.optimizer, state.schedule, self.identity.training)
            if changes:
                self._log(f"resumed from {source} with changed settings, applied: {'; '.join(changes)}")
        self._log(self._why)
        for change in self._changes:  # allowed by checkpoint.allow_changes=true
            self._log(f"changed on purpose (checkpoint.allow_changes=true): {change}")
        self._restored = self._parent = source
        return source

    def _verify(self, source: Path, meta: dict[str, Any]) -> None:
        """Every rank checks a share of the files; all ranks agree on the outcome."""
        names = sorted(meta.get("checksums") or {})
        bad = verify(source, meta, names[self.rank :: self.world_size])
        if self.world_size > 1:
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, bad, group=self._cpu_group())
            bad = [name for part in gathered for name in part]
        if bad:
            raise corrupt_error(source, bad)

    def _check_identity(self, source: Path, meta: dict[str, Any]) -> None:
        saved = meta.get("param_shapes", {})
        ours = self.identity.param_shapes
        mismatched = [
            f"{name}: saved {saved.get(name)} vs model {shape}"
            for name, shape in ours.items()
            if saved.get(name) != shape
        ]
        if mismatched:
            raise CheckpointError(
                f"{source} was saved from a different model ({meta.get('model_name')!r}); "
                f"{len(mismatched)} parameters differ, e.g. {mismatched[0]}",
                "use the same model preset/overrides as the saved run, or a new run dir",
            )

    # -- save --------------------------------------------------------------------------------------
    def maybe_save(self, state: TrainState, final: bool) -> None:
        due = (self.cfg.every and state.step % self.cfg.every == 0) or (final and self.cfg.at_end)
        if due:
            self.save(state, reason="final" if final else "periodic")

    def save(self, state: TrainState, reason: str) -> Path:
        final = self.root / f"step_{state.step}"
        self.wait()
        if self._restored is not None and final.resolve() == self._restored.resolve():
            return final  # the state is exactly what was loaded from there
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            if partial.exists():
                _remove(partial)  # a save of this step that was killed before commit
            (partial / "rng").mkdir(parents=True)
        self._barrier()
        save_rng(partial / "rng" / f"rank_{self.rank}.pt")
        meta = {
            "step": state.step,
            "samples_seen": state.samples_seen,
            "world_size": self.world_size,
            "reason": reason,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fsdp_kit": __version__,
            "torch": torch.__version__,
            "model_name": self.identity.model_name,
            "hf_config": self.identity.hf_config,
            "tokenizer": self.identity.tokenizer,
            "param_shapes": self.identity.param_shapes,
            "training": self.identity.training,
            "parent": self._parent_name(),
            "resume_request": self._request,
        }
        previous, self._parent = self._parent, final
        if self.cfg.async_save and reason != "preemption":
            future = dcp.async_save(state.state_dict(), checkpoint_id=str(partial), process_group=self._cpu_group())
            self._start_worker(self._finish_async, future, partial, final, meta)
        else:
            try:
                dcp.save(state.state_dict(), checkpoint_id=str(partial))
                meta["checksums"] = self._own_checksums(partial)  # every rank hashes what it wrote, in parallel
            except (Exception, CheckpointException) as err:  # DCP raises on every rank when any rank's write fails
                self._parent = previous
                raise self._save_failed(state.step, partial, previous, err) from err
            self._commit(partial, final, meta)
        return final

    def _parent_name(self) -> str | None:
        """The checkpoint this save continues from: its folder name inside this run dir, else its full path."""
        if self._parent is None:
            return None
        parent = self._parent.resolve()
        return parent.name if parent.parent == self.root.resolve() else str(parent)

    def _save_failed(self, step: int, partial: Path, previous: Path | None, err: BaseException) -> CheckpointError:
        """One line for a synchronous save that failed (DCP's own error for a full disk is a torch.save assertion,
        "unexpected pos 704 vs 598"); the half-written folder is removed, nothing committed is touched."""
        why = write_failure(partial, self.root, err)
        if self.rank == 0 and partial.exists():
            with suppress(OSError):  # a .partial folder is never read; the next save of this step replaces it
                _remove(partial)
        intact = (
            f"step {previous.name.removeprefix('step_')} is intact ({previous})"
            if previous is not None and (previous / MARKER).is_file()
            else "no earlier checkpoint was saved"
        )
        return CheckpointError(
            f"saving step {step} failed: {why}; {intact}",
            f"free space on {self.root} (or link checkpoints/ to larger storage) and run the same "
            "command again: it resumes from the newest intact checkpoint",
        )

    def wait(self) -> None:
        """Finish the background work of the last save: an asynchronous write and its commit, pruning."""
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._worker_error is not None:
            err, self._worker_error = self._worker_error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(
                f"saving a checkpoint failed ({type(err).__name__}: {first_line(err)})",
                "check free space and permissions of the run dir; earlier checkpoints are untouched",
            ) from err

    def _commit(self, partial: Path, final: Path, meta: dict[str, Any]) -> None:
        # every rank's shards and RNG file are on disk (the gather is also the barrier)
        meta = {**meta, "checksums": self._gather_checksums(meta.get("checksums", {}))}
        if self.rank == 0:
            self._publish(partial, final, meta)
        self._barrier()
        if self.rank == 0:
            self._start_worker(self._prune, final)

    def _finish_async(self, future: Future, partial: Path, final: Path, meta: dict[str, Any]) -> None:
        """Background thread, every rank: the write finished here; once every rank says so, rank 0 commits.

        ``async_save``'s future completes per rank, so the ranks agree over the save's own gloo group (never
        the training one); a failure anywhere leaves the folder ``.partial``, as a kill would."""
        sums: dict[str, str] | None = None
        try:
            future.result()
            sums = self._own_checksums(partial)
        except BaseException as err:  # surfaced by wait() on the training thread
            self._worker_error = err
        gathered: list[Any] = [sums]
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, sums, group=self._cpu_group())
        if any(part is None for part in gathered):
            if self._worker_error is None:
                self._worker_error = CheckpointError(
                    f"another rank failed writing {partial}", "see that rank's log; earlier checkpoints are untouched"
                )
            return
        if self.rank == 0:
            self._publish(partial, final, {**meta, "checksums": {k: v for part in gathered for k, v in part.items()}})
            self._prune(final)

    def _publish(self, partial: Path, final: Path, meta: dict[str, Any]) -> None:
        """Rank 0: write the marker (with every file's checksum) and rename the folder into place."""
        meta = {
            **meta,
            "checksum": ALGORITHM,
            "checksums": dict(sorted(meta["checksums"].items())),
            "seq": next_seq(self.root),
        }
        marker = partial / MARKER
        marker.write_text(marker_text(meta))
        _fsync(marker)
        if final.exists():  # a step trained again after resuming from an older checkpoint, or a damaged folder
            aside = move_aside(final, "replaced")
            self._log(
                f"step {meta['step']} was saved again: moved the earlier {final} aside to {aside.name} "
                "(delete it when no longer needed)"
            )
        os.rename(partial, final)
        _fsync(self.root)

    def _own_checksums(self, partial: Path) -> dict[str, str]:
        """CRC-32 of the files this rank wrote into ``partial`` (rank 0 also takes the shared ones)."""
        sums = {}
        for path in sorted(partial.rglob("*")):
            name = str(path.relative_to(partial))
            if not path.is_file() or name == MARKER:
                continue
            match = _RANK_FILE.match(name)
            owner = int(match.group(1) or match.group(2)) if match else 0
            if owner == self.rank or (self.rank == 0 and owner >= self.world_size):
                sums[name] = file_checksum(path)
        return sums

    def _gather_checksums(self, own: dict[str, str]) -> dict[str, str]:
        if self.world_size == 1:
            return own
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, own, group=self._cpu_group())
        return {name: crc for part in gathered for name, crc in part.items()}

    def _prune(self, newest: Path) -> None:
        """Rank 0, background: keep the newest ``keep`` saves of the timeline ``newest`` ends (never ``newest`` nor
        what this run resumed from; checkpoints are only saved from a finite state, the trainer's non-finite
        guard); move the saves of a branch left behind aside by name."""
        try:
            plan = prune_plan(self.root, newest, self.cfg.keep, {self._restored} if self._restored else set())
            for old in plan.remove:
                _remove(old)
            moved = [f"{path.name} -> {move_aside(path, 'abandoned').name}" for path in plan.abandon]
            if moved:
                self._log(
                    f"moved aside the checkpoints of a timeline this run left behind (it continues from "
                    f"{self._restored}; resume=auto never picks them): {', '.join(moved)}"
                )
        except OSError as err:  # a full or read-only disk must not stop training; the user is told
            self._log(f"pruning old checkpoints failed ({first_line(err)}); they are kept")

    def _start_worker(self, target: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                target(*args)
            except BaseException as err:  # surfaced by wait() on the training thread
                self._worker_error = err

        self._worker = threading.Thread(target=run, name="fsdp_kit-checkpoint", daemon=True)
        self._worker.start()

    def _cpu_group(self) -> Any:
        """A gloo group of its own: the background save's collectives must never interleave with training's."""
        if self.world_size > 1 and self._async_group is None:
            self._async_group = dist.new_group(backend="gloo", timeout=group_timeout(self.timeout_s))
        return self._async_group

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # -- preemption --------------------------------------------------------------------------------
    @contextmanager
    def preemption_guard(self) -> Iterator[None]:
        with self.flag.installed():
            yield

    def should_stop(self) -> bool:
        """Collective: call once per step on every rank. Lags the signal by one step and never waits."""
        return self.flag.poll()


def _remove(path: Path) -> None:
    """Rename first (atomic), then delete: a kill mid-delete leaves no half-deleted folder that still looks
    complete."""
    doomed = path.with_name(path.name + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    shutil.rmtree(doomed)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
