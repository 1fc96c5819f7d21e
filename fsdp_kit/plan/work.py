"""What one training step asks of a GPU, counted from the model's real ops: the input to the planner's step time.

One forward and backward run on fake tensors (no memory, no compute), as in plan/activations.py, under a dispatch
mode that prices every op: matmuls by their FLOPs (torch's own FLOP formulas), fused attention by its FLOPs (the
GPU kernels' work: 4*B*H*Sq*Sk*D forward, 2.5x that backward, which recomputes the scores) plus its bias traffic,
and every other op by the bytes it reads and writes (views and allocations move nothing). Each op that moves data
or computes counts as one kernel. Forward work is kept per transformer layer so that activation checkpointing can
add the recompute of the layers it checkpoints (ac=selective recomputes only what is not a matmul or attention).

The work is linear in the batch (FLOPs and kernels exactly; bytes to within about 1%, for inputs broadcast over the
batch): the step is traced at batch 2 and 3, and any batch is interpolated from them.
The optimizer's traffic per parameter element is traced the same way, on the configured optimizer itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.flop_counter import flop_registry

from fsdp_kit.models.build import layers
from fsdp_kit.models.objective import token_loss
from fsdp_kit.plan import activations
from fsdp_kit.torch_private import (
    OpOverload,
    TorchDispatchMode,
    fake_mode,
    op_packet,
    op_schema_arguments,
    tree_flatten,
)

_aten = torch.ops.aten
_MATMULS = frozenset({_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm})
_ALLOCATIONS = frozenset(
    {
        _aten.empty,
        _aten.empty_like,
        _aten.empty_strided,
        _aten.new_empty,
        _aten.new_empty_strided,
        _aten.lift_fresh,
        _aten.detach,
        _aten.alias,
    }
)
_WRITE_ONLY = frozenset(
    {
        _aten.zeros,
        _aten.zeros_like,
        _aten.ones_like,
        _aten.full,
        _aten.full_like,
        _aten.fill_,
        _aten.zero_,
        _aten.new_zeros,
        _aten.new_full,
        _aten.new_ones,
        _aten.scalar_tensor,
    }
)


@dataclass(frozen=True)
class Work:
    """GPU work of part of a step."""

    matmul_flops: float = 0.0
    attention_flops: float = 0.0
    memory_bytes: float = 0.0
    """Bytes read and written by the memory-bound ops (everything but matmuls and attention's arithmetic)."""
    kernels: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Work) -> Work:
        return Work(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> Work:
        return Work(*(getattr(self, f.name) * factor for f in fields(self)))

    def memory_bound_only(self) -> Work:
        """What ac=selective recomputes: the elementwise ops, not the matmuls and attention it keeps."""
        return Work(memory_bytes=self.memory_bytes, kernels=self.kernels)


@dataclass(frozen=True)
class FixedPlusPerSample:
    """``at_zero + per_sample * batch``."""

    at_zero: Work
    per_sample: Work

    def at(self, batch: int) -> Work:
        return self.at_zero + self.per_sample.scaled(batch)


@dataclass(frozen=True)
class StepWork:
    """The work of one forward + backward, as a function of the batch."""

    total: FixedPlusPerSample
    """Forward and backward, nothing recomputed."""
    layer_forward: tuple[FixedPlusPerSample, ...]
    """Each transformer layer's forward (what full checkpointing runs again in backward)."""

    def at(self, batch: int, checkpointed: AbstractSet[int] = frozenset(), selective: bool = False) -> Work:
        work = self.total.at(batch)
        for index in checkpointed:
            forward = self.layer_forward[index].at(batch)
            work = work + (forward.memory_bound_only() if selective else forward)
        return work


def _tensors(value: object) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _nbytes(tensor: torch.Tensor) -> int:
    # an expanded (stride-0) tensor is read from its storage, not element by element from memory
    return min(tensor.numel() * tensor.element_size(), tensor.untyped_storage().nbytes())


def op_bytes(func: OpOverload, args: tuple, kwargs: dict, out: object) -> int:
    """Bytes ``func`` reads and writes: its tensor inputs and its outputs (for in-place ops, the tensors it
    mutates); 0 for views and allocations."""
    if op_packet(func) in _ALLOCATIONS or func.is_view:
        return 0
    outputs = _tensors(out)
    written, read = list(outputs), []
    schema_args = op_schema_arguments(func)
    values = [*args, *(kwargs.get(arg.name) for arg in schema_args[len(args) :])]
    for arg, value in zip(schema_args, values, strict=False):
        tensors = _tensors(value)
        read += tensors
        if arg.alias_info is not None and arg.alias_info.is_write and (not outputs or arg.kwarg_only):
            written += tensors  # in-place or out=: the mutated tensors are written
    if not written:
        return 0  # metadata queries
    if op_packet(func) in _WRITE_ONLY:
        read = []
    return sum(map(_nbytes, written)) + sum(map(_nbytes, read))


class _Pricer(TorchDispatchMode):
    """Adds every op's work to ``self.current`` (a key into ``self.work``)."""

    def __init__(self) -> None:
        super().__init__()
        self.work: dict[object, Work] = {}
        self.current: object = None

    def add(self, work: Work) -> None:
        self.work[self.current] = self.work.get(self.current, Work()) + work

    def attention(self, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, backward: bool) -> None:
        batch, heads, q_len, dim = query.shape
        flops = 4 * batch * heads * q_len * key.shape[-2] * dim * (2.5 if backward else 1.0)
        bias_bytes = 0 if bias is None else _nbytes(bias) * (2 if backward else 1)  # backward writes its gradient
        self.add(Work(attention_flops=flops, memory_bytes=bias_bytes, kernels=1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if op_packet(func) in _MATMULS:
            flops = flop_registry[op_packet(func)](*args, **kwargs, out_val=out)
            self.add(Work(matmul_flops=flops, kernels=1))
        else:
            moved = op_bytes(func, args, kwargs, out)
            if moved:
                self.add(Work(memory_bytes=moved, kernels=1))
        return out


@contextmanager
def _listening(pricer: _Pricer) -> Iterator[None]:
    activations.ATTENTION_LISTENERS.append(pricer.attention)
    try:
        yield
    finally:
        activations.ATTENTION_LISTENERS.remove(pricer.attention)


def _trace(
    model: nn.Module, layer_cls: tuple[type[nn.Module], ...], batch_shapes: dict[str, tuple[int, ...]]
) -> tuple[Work, list[Work]]:
    found = layers(model, layer_cls)
    pricer = _Pricer()

    def enter(index: int) -> Callable[..., None]:
        return lambda *_: setattr(pricer, "current", index)

    def leave(*_: object) -> None:
        pricer.current = "outside"

    hooks = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(found)]
    hooks += [layer.register_forward_hook(leave) for layer in found]
    try:
        batch = {name: torch.zeros(shape, dtype=torch.long, device="meta") for name, shape in batch_shapes.items()}
        with pricer, _listening(pricer):
            pricer.current = "outside"
            loss, _ = token_loss(model, batch)
            pricer.current = "backward"  # nothing is checkpointed here: no layer forward runs in backward
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        model.zero_grad(set_to_none=True)
    return sum(pricer.work.values(), Work()), [pricer.work.get(i, Work()) for i in range(len(found))]


def step_work(
    model: nn.Module, layer_cls: tuple[type[nn.Module], ...], batch_shapes: Callable[[int], dict[str, tuple[int, ...]]]
) -> StepWork:
    """Trace ``model`` (a throwaway meta model in the compute dtype) at batch 2 and 3; ``batch_shapes(batch)``
    gives the input shapes."""
    mode = fake_mode()
    with mode, activations._gpu_like_attention():
        activations._fake_parameters(model, mode)
        # 2 and 3, not 1: at batch 1 some reshapes are free views that cost a copy at any larger batch
        two_total, two_layers = _trace(model, layer_cls, batch_shapes(2))
        three_total, three_layers = _trace(model, layer_cls, batch_shapes(3))

    def through(two: Work, three: Work) -> FixedPlusPerSample:
        per_sample = three - two
        return FixedPlusPerSample(two - per_sample.scaled(2), per_sample)

    return StepWork(
        through(two_total, three_total), tuple(through(a, b) for a, b in zip(two_layers, three_layers, strict=True))
    )


def optimizer_bytes_per_element(
    make_optimizer: Callable[[list[nn.Parameter]], Optimizer],
    dtype: torch.dtype,
    elements: int = 1 << 16,
    tensors: int = 4,
) -> tuple[float, int]:
    """(bytes read and written per parameter element, multi-tensor kernels per call) of one optimizer step,
    traced on fake parameters of ``dtype`` (the step after the first, when the state exists)."""
    mode = fake_mode()
    pricer = _Pricer()
    with mode:
        params = [nn.Parameter(torch.zeros(elements, dtype=dtype, device="meta")) for _ in range(tensors)]
        for param in params:
            param.grad = torch.zeros_like(param)
        optimizer = make_optimizer(params)
        optimizer.step()
        with pricer:
            optimizer.step()
    work = sum(pricer.work.values(), Work())
    return work.memory_bytes / (elements * tensors), int(work.kernels)
