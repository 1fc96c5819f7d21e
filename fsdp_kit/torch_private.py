"""Every private torch API fsdp_kit uses, in one place, each behind a function with a test
(tests/test_torch_private.py).

Checked on torch 2.13 (CPU wheel, the test machines) and 2.11 (+cu130, the GPU machine; DESIGN.md section 4).
torch may change any of these in a minor release: after an upgrade run ``pytest tests/test_torch_private.py``; a
failure there names the API that moved, instead of a training run going quietly wrong.

Left outside on purpose: ``torch._foreach_*`` (the multi-tensor ops torch.optim itself is built on, in
optim/anyprecision.py) and ``launch/torchrun.py``'s overrides of the elastic agent's ``_start_workers``,
``_restart_workers`` and ``_monitor_workers`` (a subclass must live where it is used); the test file checks that
those methods still exist.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch._ops import OpOverload
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed import distributed_c10d
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import FSDPModule
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves

__all__ = [
    "CHECKPOINT_WRAPPER_PREFIX",
    "CheckpointImpl",
    "CheckpointWrapper",
    "FakeTensorMode",
    "OpOverload",
    "TorchDispatchMode",
    "apply_activation_checkpointing",
    "checkpoint_wrapper",
    "direct_parameters",
    "dump_cuda_memory_history",
    "fake_mode",
    "finish_fsdp_iteration",
    "fsdp_params",
    "op_packet",
    "op_schema_arguments",
    "set_parameter",
    "set_reported_lr",
    "start_cuda_memory_history",
    "tree_flatten",
    "tree_leaves",
    "unwrap_checkpointed",
]

CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."
"""What a checkpoint wrapper adds to the names of the parameters inside it."""


def unwrap_checkpointed(module: nn.Module) -> nn.Module:
    """The module an activation-checkpoint wrapper wraps (``module`` itself when it is not a wrapper)."""
    return module._checkpoint_wrapped_module if isinstance(module, CheckpointWrapper) else module


def finish_fsdp_iteration(model: nn.Module) -> None:
    """Run FSDP2's end-of-backward callback on the model's root FSDP module (reduce the gradients computed, reshard,
    reset the groups' states), as an interrupted backward (out of memory) never did. No-op without FSDP."""
    root = next((m for m in model.modules() if isinstance(m, FSDPModule)), None)
    if root is not None:
        root._get_fsdp_state()._root_post_backward_final_callback()


def fsdp_params(module: FSDPModule) -> list:
    """The FSDPParam records of one FSDP module (each has ``param_dtype``, ``reduce_dtype``, ``orig_dtype``,
    ``sharded_param``); FSDP2 has no public reader of its per-parameter policy."""
    group = module._get_fsdp_state()._fsdp_param_group
    return list(group.fsdp_params) if group is not None else []


def start_cuda_memory_history(max_entries: int) -> None:
    """Record the CUDA caching allocator's events (for https://pytorch.org/memory_viz)."""
    torch.cuda.memory._record_memory_history(max_entries=max_entries)


def dump_cuda_memory_history(path: str | Path) -> None:
    """Write the recorded allocator events to ``path`` and stop recording."""
    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)


def fake_mode(cache: bool = True) -> FakeTensorMode:
    """A fake-tensor mode that also accepts real (e.g. meta) inputs. ``cache=False`` turns off the process-wide
    dispatch cache, whose outputs may not share storage with their inputs (for code that counts storages)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    if not cache:
        mode.cache_enabled = False
    return mode


def op_packet(func: OpOverload) -> object:
    """The overload packet of an aten op (``aten.mm`` for ``aten.mm.default``), the key torch's FLOP table uses."""
    return func._overloadpacket


def op_schema_arguments(func: OpOverload) -> list:
    """The op's schema arguments (each has ``name``, ``kwarg_only``, ``alias_info``)."""
    return list(func._schema.arguments)


def direct_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter | None]]:
    """The module's own parameter slots (not its children's), None slots included, in registration order."""
    return iter(list(module._parameters.items()))


def set_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    """Put ``param`` in the module's slot ``name`` without the checks and hooks of ``register_parameter`` (a swap
    that is undone later must leave no trace)."""
    module._parameters[name] = param


def set_reported_lr(schedule: torch.optim.lr_scheduler.LRScheduler, lrs: list[float]) -> None:
    """Make ``schedule.get_last_lr()`` report ``lrs`` (after the learning rates were set by hand)."""
    schedule._last_lr = list(lrs)


def set_group_timeout(group: distributed_c10d.ProcessGroup, timeout: datetime.timedelta) -> None:
    """Give an existing process group ``timeout`` for its collectives (torch has no public way for every backend:
    a DeviceMesh makes its groups with torch's default, 30 minutes for gloo)."""
    distributed_c10d._set_pg_timeout(timeout, group)
