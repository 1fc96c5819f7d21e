"""The rehearsal's record of each rank (``fsdp-kit rehearse`` only; loaded by fsdp_kit/rehearse/inject): where it ran
and how long its steps took, appended as JSON lines to ``$FSDP_KIT_REHEARSE_PROBE/rank<R>.jsonl``.

Per attempt (a torchrun restart, a Slurm requeue) one ``layout`` line: node, rank, local rank, world size, the
rendezvous endpoint, and the device mesh the parameters are sharded over (its ranks, dimension names and
placements: which ranks hold which shard, which replicate). Then one ``step`` line per training step with its
wall time on this rank.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

PROBE_ENV = "FSDP_KIT_REHEARSE_PROBE"


def mesh_of(model: Any) -> dict[str, Any] | None:
    """The mesh of the model's first sharded parameter: ranks (nested lists), dimension names, placements."""
    for param in model.parameters():
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None:
            return {
                "ranks": mesh.mesh.tolist(),
                "dims": list(mesh.mesh_dim_names or ()),
                "placements": [str(p) for p in param.placements],
            }
    return None


def install() -> None:
    """Time every training step of this rank; a no-op outside a trainer under torchrun."""
    folder = os.environ.get(PROBE_ENV, "")
    if not folder or not os.environ.get("TORCHELASTIC_RUN_ID") or "RANK" not in os.environ:
        return
    from fsdp_kit.training.trainer import Trainer

    rank = int(os.environ["RANK"])
    path = Path(folder) / f"rank{rank}.jsonl"
    where = {
        "node": socket.gethostname(),
        "rank": rank,
        "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        "requeue": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
    }
    original = Trainer._train_step
    started = {"layout": False}

    def write(record: dict[str, Any]) -> None:
        with path.open("a") as handle:
            handle.write(json.dumps({**where, **record}) + "\n")

    def timed_train_step(self, micro_batches):
        if not started["layout"]:
            started["layout"] = True
            write(
                {
                    "kind": "layout",
                    "world_size": self.env.world_size,
                    "first_step": self.state.step + 1,
                    "rendezvous": os.environ.get("MASTER_ADDR"),
                    "mesh": mesh_of(self.model),
                }
            )
        begin = time.perf_counter()
        result = original(self, micro_batches)
        write({"kind": "step", "step": self.state.step + 1, "seconds": time.perf_counter() - begin})
        return result

    Trainer._train_step = timed_train_step  # type: ignore[method-assign]  # the probe wraps the step, by design


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of ``path`` (none where it does not exist; a line still being written is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
