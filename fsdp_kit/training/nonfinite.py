"""Name the module where a non-finite step started: the first whose forward output, else whose output gradient,
is not finite.

Runs only on a step the non-finite guard already flagged (finite steps pay nothing): the step's micro-batches go
through forward and backward again with hooks on every module, and the gradients they leave are dropped (the
update of that step is skipped anyway). Every rank runs it (FSDP's collectives need them all) and the ranks agree
on the earliest module in execution order, which is the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fsdp_kit.policies.contract import clean_name
from fsdp_kit.torch_private import tree_leaves

_NONE = 2**62  # "found nothing" in the ranks' all-reduce of the earliest position


def _nonfinite(value: Any) -> bool:
    return any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
        for t in tree_leaves(value)
    )


def locate(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    world_size: int,
) -> str | None:
    """ "forward output of NAME" / "gradient of NAME's output" for the first non-finite module, else None.

    ``loss_of(batch)`` runs the forward and returns the scalar the step backpropagates."""
    names = {id(module): clean_name(name) for name, module in model.named_modules() if name}
    order: list[str] = []  # module names in the order their outputs were produced (the same on every rank)
    first = {"forward": _NONE, "backward": _NONE}
    backward_order: list[str] = []
    recording = {"forward": True}

    def on_output(module: nn.Module, _args: Any, output: Any) -> None:
        if not recording["forward"]:  # activation checkpointing recomputes forward during backward
            return
        position = len(order)
        order.append(names[id(module)])
        if first["forward"] == _NONE and _nonfinite(output):
            first["forward"] = position
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(on_grad(names[id(module)]))

    def on_grad(name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            backward_order.append(name)
            if first["backward"] == _NONE and not bool(torch.isfinite(grad).all()):
                first["backward"] = len(backward_order) - 1

        return hook

    handles = [module.register_forward_hook(on_output) for module in model.modules() if id(module) in names]
    try:
        for batch in micro_batches:
            order.clear()
            backward_order.clear()
            recording["forward"] = True
            loss = loss_of(batch)
            recording["forward"] = False
            loss.backward()
            found = _agree(first, world_size, loss.device)
            if found is not None:
                kind, position = found
                return (
                    f"forward output of {order[position]}"
                    if kind == "forward"
                    else f"gradient of {backward_order[position]}'s output"
                )
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return None


def _agree(first: dict[str, int], world_size: int, device: torch.device) -> tuple[str, int] | None:
    """The earliest position over the ranks, forward before backward."""
    positions = torch.tensor([first["forward"], first["backward"]], dtype=torch.int64, device=device)
    if world_size > 1:
        dist.all_reduce(positions, op=dist.ReduceOp.MIN)
    forward, backward = positions.tolist()
    if forward != _NONE:
        return "forward", forward
    if backward != _NONE:
        return "backward", backward
    return None
