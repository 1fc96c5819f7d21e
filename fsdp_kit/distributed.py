"""Who am I (rank, world, device), the process group, and the device mesh."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fsdp_kit.checks import check_fields

if TYPE_CHECKING:  # torch is imported where it is used: the config (DistConfig) must not import it
    import torch  # late: config.py imports DistConfig from here, and must not import torch
    from torch.distributed.device_mesh import DeviceMesh

    from fsdp_kit.policies.config import ShardingConfig


@dataclass
class DistConfig:
    backend: str | None = None
    """null picks nccl on GPU, gloo on CPU."""
    timeout_s: int = 600
    """Collective timeout, for every process group of the job (the sharding mesh's, the checkpoint's and the
    preemption flag's too): a collective whose peer or network stopped answering fails after this long, and
    under torchrun (--max-restarts) the workers restart from the newest checkpoint. Joining the group at start-up
    waits at least JOIN_TIMEOUT_S for the slowest process."""

    def check(self, prefix: str = "dist.") -> None:
        """Each setting finite and in its range (``prefix``: where this config sits in the job)."""
        check_fields(self, prefix, {"timeout_s": ">0"})


@dataclass(frozen=True)
class Runtime:
    """What the launcher (torchrun, submitit, or nothing) tells this process about the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type


@dataclass(frozen=True)
class DistEnv(Runtime):
    """A ``Runtime`` with its process group up and the data-parallel mesh built."""

    mesh: DeviceMesh | None = None

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist  # late: config.py imports DistConfig from here

            dist.barrier()


def detect() -> Runtime:
    """Read the launcher's environment: RANK/WORLD_SIZE/LOCAL_RANK from torchrun, or submitit's job environment
    (one task per GPU, as `fsdp-kit submit` and Hydra's submitit launcher start them)."""
    import torch  # late: config.py imports DistConfig from here, and must not import torch

    env = os.environ
    if "RANK" not in env and (env.get("SUBMITIT_EXECUTOR") == "slurm" or "SUBMITIT_LOCAL_JOB_ID" in env):
        import submitit  # late: only a submitit job needs it

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return Runtime(rank, world_size, local_rank, local_world_size, device)


# Forming the group waits for the last process to start (imports, a container, a node booting), which can take far
# longer than any collective should.
JOIN_TIMEOUT_S = 600


def group_timeout(seconds: float | None) -> datetime.timedelta | None:
    """The timeout to give a new process group: torch gives one made without it 30 minutes (gloo), whatever the
    default group has."""
    return datetime.timedelta(seconds=seconds) if seconds is not None else None


def _apply_timeout(groups: list, timeout: datetime.timedelta) -> None:
    """Give ``groups`` the job's collective timeout: the default group was formed with JOIN_TIMEOUT_S, the mesh's own
    (hybrid sharding's shard and replica groups) with torch's default (30 minutes for gloo); torch has no public way
    to pass one for every backend."""
    from fsdp_kit.torch_private import set_group_timeout  # late: this module stays light for config paths

    for group in groups:
        set_group_timeout(group, timeout)


@contextmanager
def session(runtime: Runtime, cfg: DistConfig, sharding: ShardingConfig) -> Iterator[DistEnv]:
    """Start the process group and mesh; tear the group down on exit, also on errors."""
    import torch  # late: config.py imports DistConfig from here, and must not import torch
    import torch.distributed as dist  # late: config.py imports DistConfig from here
    from torch.distributed.device_mesh import init_device_mesh

    from fsdp_kit.policies.sharding import mesh_layout  # late: it imports torch (see above)

    backend = cfg.backend or ("nccl" if runtime.device_type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    join = datetime.timedelta(seconds=max(cfg.timeout_s, JOIN_TIMEOUT_S))
    if runtime.device_type == "cuda":
        torch.cuda.set_device(runtime.device)
    started_here = not dist.is_initialized()
    if started_here:
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(
                backend,
                rank=runtime.rank,
                world_size=runtime.world_size,
                timeout=join,
                device_id=runtime.device if backend == "nccl" else None,
            )
        else:  # a plain `python -m fsdp_kit.train`: a group of one, no rendezvous needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    try:
        shape, names = mesh_layout(sharding, runtime.world_size, runtime.local_world_size)
        mesh = init_device_mesh(runtime.device_type, shape, mesh_dim_names=names)
        if runtime.world_size > 1:
            _apply_timeout([*([dist.group.WORLD] if started_here else []), *mesh.get_all_groups()], timeout)
        yield DistEnv(
            runtime.rank, runtime.world_size, runtime.local_rank, runtime.local_world_size, runtime.device, mesh
        )
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()
