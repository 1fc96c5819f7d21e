"""Apply the policies to a meta-device model in a fixed, visible order: AC -> compile -> FSDP."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from fsdp_kit.config import ActivationCheckpointConfig, PrecisionConfig, ShardingConfig, TrainConfig, WrapConfig
from fsdp_kit.models.build import layer_classes, layers
from fsdp_kit.policies.activation import apply_checkpointing
from fsdp_kit.policies.precision import mixed_precision_policy
from fsdp_kit.policies.sharding import offload_policy, reshard_after_forward
from fsdp_kit.policies.wrapping import fsdp_units


@dataclass(frozen=True)
class Policies:
    """The parts of a job that decide how the model is wrapped, checkpointed, compiled and sharded."""

    precision: PrecisionConfig
    sharding: ShardingConfig
    wrap: WrapConfig
    ac: ActivationCheckpointConfig
    compile: bool = False

    @classmethod
    def of(cls, job: TrainConfig) -> Policies:
        return cls(job.precision, job.sharding, job.wrap, job.ac, compile=job.trainer.compile)

    @property
    def needs_layer_classes(self) -> bool:
        return self.wrap.policy == "transformer" or self.ac.mode != "none" or self.compile


@dataclass(frozen=True)
class Applied:
    """What apply_policies did, for the run log."""

    checkpointed_layers: int
    compiled_layers: int
    fsdp_units: int


def check_policies(model: nn.Module, policies: Policies) -> None:
    """Fail early (on the meta model, before any process group) if a named layer class does not exist."""
    if policies.needs_layer_classes:
        layer_classes(model, policies.wrap.layer_cls)


def apply_policies(model: nn.Module, policies: Policies, mesh: DeviceMesh) -> Applied:
    layer_cls = layer_classes(model, policies.wrap.layer_cls) if policies.needs_layer_classes else ()

    checkpointed = apply_checkpointing(model, policies.ac, layer_cls)

    compiled = layers(model, layer_cls) if policies.compile else []
    for layer in compiled:
        layer.compile()

    fsdp_kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward(policies.sharding),
        "mp_policy": mixed_precision_policy(policies.precision),
        "offload_policy": offload_policy(policies.sharding),
    }
    # HF layers return views of their inputs (T5Block's output tuple); FSDP2 warns that an in-place op on
    # such a view would skip its pre-backward hook. HF layers do not do that, and the tests check gradients
    # against a single process, so the warning is noise for users.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    units = fsdp_units(model, policies.wrap, layer_cls)
    for unit in units:
        fully_shard(unit, **fsdp_kwargs)
    # The root's parameters are needed again as soon as backward starts: resharding them after forward would
    # only add an all-gather per step (FSDP2's own default keeps the root unsharded, as FSDP1 did).
    fully_shard(model, **{**fsdp_kwargs, "reshard_after_forward": False})
    return Applied(checkpointed, len(compiled), len(units) + 1)
