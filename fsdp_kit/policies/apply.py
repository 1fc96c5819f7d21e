"""Apply the policies to a meta-device model in a fixed, visible order: AC -> compile -> FSDP."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from fsdp_kit.models.build import layer_classes, layers
from fsdp_kit.policies.activation import apply_checkpointing
from fsdp_kit.policies.config import (
    ActivationCheckpointConfig,
    CheckpointMode,
    PrecisionConfig,
    ShardingConfig,
    WrapConfig,
    WrapPolicy,
)
from fsdp_kit.policies.contract import clean_name, keep_fp32_names
from fsdp_kit.policies.precision import keep_fp32_policy, mixed_precision_policy
from fsdp_kit.policies.sharding import offload_policy, reshard_after_forward
from fsdp_kit.policies.wrapping import fsdp_units

if TYPE_CHECKING:
    from fsdp_kit.config import TrainConfig


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
        return self.wrap.policy == WrapPolicy.transformer or self.ac.mode != CheckpointMode.none or self.compile


def set_prefetch(units: list[nn.Module], depth: int) -> None:
    """All-gather the next ``depth`` units while one computes, in forward order and, in backward, in reverse."""
    if depth <= 0 or len(units) < 2:
        return
    sharded = [cast(FSDPModule, unit) for unit in units]
    for index, unit in enumerate(sharded):
        unit.set_modules_to_forward_prefetch(sharded[index + 1 : index + 1 + depth])
        unit.set_modules_to_backward_prefetch(sharded[max(0, index - depth) : index][::-1])


@dataclass(frozen=True)
class Applied:
    """What apply_policies did, for the run log."""

    checkpointed_layers: int
    compiled_layers: int
    fsdp_units: int
    fp32_units: int = 0
    """Units of the model's ``_keep_in_fp32_modules`` (T5's ``wo``) sharded with an fp32 policy."""


def check_policies(model: nn.Module, policies: Policies) -> None:
    """Fail early (on the meta model, before any process group) if a named layer class does not exist."""
    if policies.needs_layer_classes:
        layer_classes(model, policies.wrap.layer_cls)


def apply_policies(model: nn.Module, policies: Policies, mesh: DeviceMesh | None) -> Applied:
    layer_cls = layer_classes(model, policies.wrap.layer_cls) if policies.needs_layer_classes else ()

    checkpointed = apply_checkpointing(model, policies.ac, layer_cls)

    compiled = layers(model, layer_cls) if policies.compile else []
    for layer in compiled:
        layer.compile()

    offload = offload_policy(policies.sharding)

    def shard(module: nn.Module, mp_policy: MixedPrecisionPolicy, reshard: bool) -> None:
        fully_shard(module, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard)

    mixed = mixed_precision_policy(policies.precision)
    # HF layers return views of their inputs (T5Block's output tuple); FSDP2 warns that an in-place op on
    # such a view would skip its pre-backward hook. HF layers do not do that, and the tests check gradients
    # against a single process, so the warning is noise for users.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    reshard = reshard_after_forward(policies.sharding)
    # The modules HF keeps in fp32 (T5's wo, which overflows in bf16/fp16) compute in fp32 under the mixed
    # presets: each is its own unit with an fp32 policy, sharded before the layer that holds it.
    fp32 = keep_fp32_policy(policies.precision)
    kept = keep_fp32_modules(model) if fp32 is not None else []
    for module in kept:
        shard(module, cast(MixedPrecisionPolicy, fp32), reshard)
    units = fsdp_units(model, policies.wrap, layer_cls)
    for index, unit in enumerate(units):
        if isinstance(unit, FSDPModule):  # a size unit that is exactly a kept-fp32 module: sharded already
            continue
        keep_last = index == len(units) - 1 and not policies.sharding.reshard_last_unit
        shard(unit, mixed, reshard and not keep_last)
    # The root's parameters are needed again as soon as backward starts: resharding them after forward would
    # only add an all-gather per step (FSDP2's own default keeps the root unsharded, as FSDP1 did).
    shard(model, mixed, False)
    if policies.wrap.policy == WrapPolicy.transformer:  # only layers come in the order they run
        set_prefetch(units, policies.sharding.prefetch)
    return Applied(checkpointed, len(compiled), len(units) + len(kept) + 1, len(kept))


def keep_fp32_modules(model: nn.Module) -> list[nn.Module]:
    """The modules named by the model's ``_keep_in_fp32_modules``, matched per name component as transformers
    matches them, that hold parameters."""
    keep = keep_fp32_names(model)
    return [
        module
        for name, module in model.named_modules()
        if keep and clean_name(name).rsplit(".", 1)[-1] in keep and next(module.parameters(), None) is not None
    ]


def reshard_all(model: nn.Module) -> None:
    """Reshard every FSDP unit. Units that keep their parameters after forward (the root, the last unit,
    shard_grad_op) reshard only after a backward, which forward-only passes and interrupted steps never reach."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
