"""Save, commit, prune and find checkpoints.

Layout: ``<run_dir>/checkpoints/step_<N>/`` holds the DCP shards, ``.metadata``, ``rng/rank_<r>.pt`` and
``fsdp_kit.json``. A save writes into ``step_<N>.partial`` and rank 0 renames it only after every rank has
finished, so a folder named ``step_<N>`` is always complete: ``kill -9`` mid-save leaves a ``.partial``
that is never read. Pruning (``keep``) removes older complete checkpoints only after a newer one is
committed. DCP metadata is pickled: a checkpoint folder is trusted input, like any pickle.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from transformers import PretrainedConfig

from fsdp_kit import __version__
from fsdp_kit.checkpoint.preemption import PreemptionFlag
from fsdp_kit.checkpoint.state import TrainState, load_rng, save_rng
from fsdp_kit.config import CheckpointConfig
from fsdp_kit.errors import CheckpointError, first_line

MARKER = "fsdp_kit.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint records about the model, to refuse loading into a different one and to export."""

    model_name: str
    hf_config: dict[str, Any]
    tokenizer: str
    param_shapes: dict[str, list[int]]

    @property
    def num_params(self) -> int:
        return sum(int(torch.Size(shape).numel()) for shape in self.param_shapes.values())

    @classmethod
    def of(cls, model: torch.nn.Module, config: PretrainedConfig, model_name: str, tokenizer: str) -> RunIdentity:
        shapes = {name.replace("_checkpoint_wrapped_module.", ""): list(param.shape)
                  for name, param in model.named_parameters()}
        return cls(model_name, config.to_dict(), tokenizer, shapes)


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [path for _, path in sorted(found)]


def read_marker(path: Path) -> dict[str, Any]:
    """The checkpoint's ``fsdp_kit.json``, or a CheckpointError naming what is wrong with the folder."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist", "pass an existing <run_dir>/checkpoints/step_<N>")
    if path.name.endswith(".partial"):
        raise CheckpointError(f"{path} is an incomplete save (interrupted before it was committed)",
                              "resume from a step_<N> folder without .partial")
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{marker} is missing, so {path} is not a complete fsdp_kit checkpoint",
                              "pick a complete step_<N> folder (each holds fsdp_kit.json)")
    try:
        meta = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{marker} is corrupt ({err})", "pick another checkpoint") from None
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path / '.metadata'} is missing (the DCP index of the shards)",
                              "pick another checkpoint")
    return meta


class Manager:
    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path, rank: int, world_size: int,
                 identity: RunIdentity) -> None:
        self.cfg, self.rank, self.world_size, self.identity = cfg, rank, world_size, identity
        self.root = Path(run_dir) / "checkpoints"
        self.flag = PreemptionFlag(world_size)
        self._pending: tuple[Future, Path, Path, dict[str, Any]] | None = None
        self._async_group = None

    # -- restore -----------------------------------------------------------------------------------
    def restore(self, state: TrainState) -> Path | None:
        source = self._resume_source()
        if source is None:
            return None
        meta = read_marker(source)
        self._check_identity(source, meta)
        try:
            payload = state.state_dict()
            dcp.load(payload, checkpoint_id=str(source))
        except (Exception, CheckpointException) as err:  # DCP raises many types for damaged shards
            raise CheckpointError(f"loading {source} failed ({type(err).__name__}: {first_line(err)})",
                                  "the shards are damaged or incomplete; resume from another checkpoint") from None
        state.load_state_dict(payload)
        load_rng(source / "rng" / f"rank_{self.rank}.pt")
        return source

    def _resume_source(self) -> Path | None:
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            complete = complete_checkpoints(self.root)
            return complete[-1] if complete else None
        return Path(self.cfg.resume)

    def _check_identity(self, source: Path, meta: dict[str, Any]) -> None:
        saved = meta.get("param_shapes", {})
        ours = self.identity.param_shapes
        mismatched = [f"{name}: saved {saved.get(name)} vs model {shape}"
                      for name, shape in ours.items() if saved.get(name) != shape]
        if mismatched:
            raise CheckpointError(
                f"{source} was saved from a different model ({meta.get('model_name')!r}); "
                f"{len(mismatched)} parameters differ, e.g. {mismatched[0]}",
                "use the same model preset/overrides as the saved run, or a new run dir")

    # -- save --------------------------------------------------------------------------------------
    def maybe_save(self, state: TrainState, final: bool) -> None:
        due = (self.cfg.every and state.step % self.cfg.every == 0) or (final and self.cfg.at_end)
        if due:
            self.save(state, reason="final" if final else "periodic")

    def save(self, state: TrainState, reason: str) -> Path:
        final = self.root / f"step_{state.step}"
        self.wait()
        if (final / MARKER).is_file():
            return final  # already committed (e.g. resumed from it): never overwrite
        partial = final.with_name(final.name + ".partial")
        if self.rank == 0:
            if partial.exists():
                _remove(partial)  # a save of this step that was killed before commit
            (partial / "rng").mkdir(parents=True)
        self._barrier()
        save_rng(partial / "rng" / f"rank_{self.rank}.pt")
        meta = {"step": state.step, "samples_seen": state.samples_seen, "world_size": self.world_size,
                "reason": reason, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "fsdp_kit": __version__, "torch": torch.__version__,
                "model_name": self.identity.model_name, "hf_config": self.identity.hf_config,
                "tokenizer": self.identity.tokenizer, "param_shapes": self.identity.param_shapes}
        if self.cfg.async_save and reason != "preemption":
            future = dcp.async_save(state.state_dict(), checkpoint_id=str(partial), process_group=self._cpu_group())
            self._pending = (future, partial, final, meta)
        else:
            dcp.save(state.state_dict(), checkpoint_id=str(partial))
            self._commit(partial, final, meta)
        return final

    def wait(self) -> None:
        """Finish an in-flight asynchronous save (and commit it)."""
        if self._pending is None:
            return
        future, partial, final, meta = self._pending
        self._pending = None
        future.result()
        self._commit(partial, final, meta)

    def _commit(self, partial: Path, final: Path, meta: dict[str, Any]) -> None:
        self._barrier()  # every rank's shards and RNG file are on disk
        if self.rank == 0:
            marker = partial / MARKER
            marker.write_text(json.dumps(meta, indent=1))
            _fsync(marker)
            os.rename(partial, final)
            _fsync(self.root)
            for old in complete_checkpoints(self.root)[: -self.cfg.keep]:
                _remove(old)
        self._barrier()

    def _cpu_group(self) -> Any:
        """A gloo group of its own: the background save's collectives must never interleave with training's."""
        if self.world_size > 1 and self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
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
