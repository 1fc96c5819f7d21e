"""A run dir's checkpoints form a tree: each save records its parent (the checkpoint its process restored from, or
that process's previous save) and a sequence number one above every save already in the run dir.

The *current timeline* is the chain of ancestors of the newest save (by sequence, not by step number: a run that
resumed from step 8 and saved step 9 is newer than the step 10 it left behind). ``resume=auto`` continues from that
newest save; pruning keeps the newest ``keep`` saves of that chain, and moves the checkpoints of a branch left behind
aside by name (``step_10.abandoned-<time>``) instead of deleting them. Checkpoints written before saves recorded a
parent count as one line of history in step order, as they were then.

An explicit ``checkpoint.resume=PATH`` is recorded in every save of the timeline it starts (``resume_request``): a
restart of the same command (a Slurm requeue of the same sbatch) finds its own newer saves and continues from
them instead of going back to PATH.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fsdp_kit.checkpoint.marker import MARKER, read_marker
from fsdp_kit.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoints under ``root``, in step order (lowest first)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return [path for _, path in sorted(found)]


@dataclass(frozen=True)
class Save:
    """One committed checkpoint as the timeline sees it."""

    path: Path
    step: int
    order: tuple[int, int]
    """(1, seq) for saves that record one; (0, step) for older ones, which all came before."""
    parent: Path | None
    request: str | None
    """The explicit ``checkpoint.resume`` that started this save's timeline (resolved), if any."""


def scan(root: Path) -> tuple[list[Save], list[CheckpointError]]:
    """The committed checkpoints under ``root``, oldest first, and why the others' markers cannot be read."""
    saves: list[Save] = []
    unreadable: list[CheckpointError] = []
    previous_legacy = None
    for path in complete_checkpoints(root):
        try:
            meta = read_marker(path, warn_legacy=False)
        except CheckpointError as err:
            unreadable.append(err)
            continue
        named = _STEP_DIR.match(path.name)  # complete_checkpoints lists only step_<N> folders
        step = int(meta["step"]) if "step" in meta else int(named.group(1) if named else -1)
        if isinstance(meta.get("seq"), int):
            parent = meta.get("parent")
            saves.append(
                Save(
                    path,
                    step,
                    (1, meta["seq"]),
                    root / parent if parent and "/" not in parent else Path(parent) if parent else None,
                    meta.get("resume_request"),
                )
            )
        else:  # before timelines: a linear history in step order
            saves.append(Save(path, step, (0, step), previous_legacy, None))
            previous_legacy = path
    return sorted(saves, key=lambda save: save.order), unreadable


def newest(root: Path) -> Save | None:
    """The newest save of the run dir's newest timeline; a marker that cannot be read is an error (it might be the
    newest, and resuming from an older one would silently drop training)."""
    saves, unreadable = scan(root)
    if unreadable:
        raise CheckpointError(
            f"{unreadable[-1].problem} (so which checkpoint of {root} is the newest is unknown)",
            f"move that checkpoint out of {root}, or pass checkpoint.resume=PATH",
        )
    return saves[-1] if saves else None


def next_seq(root: Path) -> int:
    saves, _ = scan(root)
    return 1 + max((save.order[1] for save in saves if save.order[0] == 1), default=0)


def lineage(saves: list[Save], tip: Path) -> list[Save]:
    """``tip`` and its ancestors under the same root, newest first."""
    by_path = {save.path: save for save in saves}
    chain: list[Save] = []
    current = by_path.get(tip)
    while current is not None and current not in chain:
        chain.append(current)
        current = by_path.get(current.parent) if current.parent is not None else None
    return chain


@dataclass(frozen=True)
class PrunePlan:
    remove: list[Path]
    """Older saves of the current timeline beyond ``keep``."""
    abandon: list[Path]
    """Saves on no path to the newest save: a branch left behind."""


def prune_plan(root: Path, tip: Path, keep: int, protected: set[Path]) -> PrunePlan:
    """What pruning after the save ``tip`` does; ``tip`` and ``protected`` (what this run resumed from) stay.
    Checkpoints whose marker cannot be read are never touched."""
    saves, _ = scan(root)
    chain = lineage(saves, tip)
    on_chain = {save.path for save in chain}
    kept = {path.resolve() for path in protected}
    remove = [save.path for save in chain[max(keep, 1) :] if save.path.resolve() not in kept]
    abandon = [save.path for save in saves if save.path not in on_chain and save.path.resolve() not in kept]
    return PrunePlan(remove, abandon)


def move_aside(path: Path, label: str) -> Path:
    """Rename ``path`` to ``<name>.<label>-<time>`` (a free name), never deleting anything."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, suffix = path.with_name(f"{path.name}.{label}-{stamp}"), 1
    while aside.exists():
        aside, suffix = path.with_name(f"{path.name}.{label}-{stamp}-{suffix}"), suffix + 1
    os.rename(path, aside)
    return aside


@dataclass(frozen=True)
class ResumeFrom:
    path: Path
    why: str
    """One line for the log: which checkpoint and why."""
    request: str | None
    """What the saves of this run record as ``resume_request``."""


def resume_source(resume: str, root: Path) -> ResumeFrom | None:
    """The checkpoint ``checkpoint.resume=resume`` loads in a run dir whose checkpoints are under ``root``."""
    if resume == "never":
        return None
    own = newest(root)
    if resume == "auto":
        return (
            ResumeFrom(
                own.path, f"resuming from {own.path}: the newest save of this run dir's current timeline", own.request
            )
            if own
            else None
        )
    if own is not None and own.request == requested(resume):
        return ResumeFrom(
            own.path,
            f"resuming from {own.path}: this run dir's newest save, which continues "
            f"checkpoint.resume={resume} (an explicit path applies only on the run's first start)",
            own.request,
        )
    return ResumeFrom(Path(resume), f"resuming from {resume} (checkpoint.resume)", requested(resume))


def requested(resume: str) -> str:
    """An explicit resume path as recorded in the saves of the timeline it starts."""
    return str(Path(resume).resolve())
