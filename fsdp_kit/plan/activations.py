"""Activation memory, measured rather than guessed: the bytes autograd saves for backward, per sample.

The model runs forward on fake meta tensors (no memory, no compute) under ``saved_tensors_hooks``; every
saved tensor's storage is counted once, parameters excluded, and attributed to the transformer layer that
was running. The outputs of the ops that ``ac=selective`` keeps (``policies.activation.SAVED_OPS``) are recorded
per layer too, by a dispatch mode under the same trace. Attention is swapped for a stand-in that saves what GPU
memory-efficient/flash attention saves
(q, k, v, output, log-sum-exp, and the bias when there is one), because the math fallback that meta tensors
take would store the full score matrices that GPU kernels never materialize.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from fsdp_kit.models.build import layers
from fsdp_kit.models.objective import token_loss
from fsdp_kit.policies.activation import SAVED_OPS
from fsdp_kit.torch_private import FakeTensorMode, TorchDispatchMode, direct_parameters, fake_mode, set_parameter


@dataclass(frozen=True)
class ActivationProfile:
    """Per-sample bytes for one batch shape."""

    outside_layers: float
    """Saved outside the transformer layers (embeddings, final norms, logits and loss)."""
    per_layer: tuple[float, ...]
    """Saved inside each layer, in execution order."""
    layer_inputs: tuple[dict[int, float], ...]
    """Each layer's tensor inputs as {storage id: bytes per sample} (what activation checkpointing keeps;
    tensors every layer receives, like T5's position bias, share one storage and count once)."""
    selective_outputs: tuple[dict[int, float], ...] = ()
    """Per layer, the outputs of the ops ac=selective keeps (matmuls, attention) as {storage id: bytes per
    sample}."""

    def saved(self, checkpointed: set[int], selective: bool = False) -> float:
        """Bytes alive at the end of forward when the layers at these indices are checkpointed (``selective``:
        checkpointed layers also keep their matmul and attention outputs)."""
        kept: dict[int, float] = {}
        for index in checkpointed:
            kept.update(self.layer_inputs[index])
            if selective:
                kept.update(self.selective_outputs[index])
        return (
            self.outside_layers
            + sum(kept.values())
            + sum(size for index, size in enumerate(self.per_layer) if index not in checkpointed)
        )

    def shared_inputs(self) -> float:
        """Bytes of the tensors that several layers receive (T5's position bias, the encoder output for every
        decoder layer): autograd sums their gradients from each layer into one buffer of the same size, which
        lives until the first layer's backward."""
        seen: dict[int, tuple[int, float]] = {}
        for inputs in self.layer_inputs:
            for key, size in inputs.items():
                count, _ = seen.get(key, (0, size))
                seen[key] = (count + 1, size)
        return sum(size for count, size in seen.values() if count > 1)

    def backward_working_set(self, checkpointed: set[int], selective: bool = False) -> float:
        """Extra bytes while one layer runs backward: the gradients of its activations (about one more layer's
        worth), what it recomputes if checkpointed (the whole layer; with ``selective`` all but the matmul and
        attention outputs it kept), and the gradient buffers of the inputs all layers share."""
        if not self.per_layer:
            return 0.0
        largest = max(self.per_layer)
        recomputed = 0.0
        if checkpointed:
            recomputed = max(
                max(self.per_layer[i] - (sum(self.selective_outputs[i].values()) if selective else 0.0), 0.0)
                for i in checkpointed
            )
        return largest + recomputed + self.shared_inputs()


ATTENTION_LISTENERS: list = []
"""Called as ``listener(query, key, bias, backward=...)`` for each fused-attention forward and backward the
stand-in runs (plan/work.py prices them)."""


class _SavedLikeEfficientAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, bias):
        output = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        for recorder in _Recorder.active:  # the fused kernels' outputs, which ac=selective keeps
            recorder.record((output, lse))
        for listener in ATTENTION_LISTENERS:
            listener(query, key, bias, backward=False)
        ctx.save_for_backward(query, key, value, output, lse, *(() if bias is None else (bias,)))
        return output

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors  # read once: a checkpointed layer's saved tensors unpack once
        query, key, value = saved[:3]
        bias = saved[5] if len(saved) > 5 else None
        for listener in ATTENTION_LISTENERS:
            listener(query, key, bias, backward=True)
        # Allocations only (fake tensors hold no values): the kernel's own traffic is priced by the listeners.
        bias_grad = torch.empty_like(bias) if bias is not None else None
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), bias_grad


@contextmanager
def _gpu_like_attention() -> Iterator[None]:
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        bias = attn_mask if attn_mask is not None and attn_mask.is_floating_point() else None
        return _SavedLikeEfficientAttention.apply(query, key, value, bias)

    F.scaled_dot_product_attention = attention  # type: ignore[assignment]  # a stand-in, restored below
    torch.nn.functional.scaled_dot_product_attention = attention  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        torch.nn.functional.scaled_dot_product_attention = original


class _Recorder(TorchDispatchMode):
    """Records, per running layer, the output storages of the ops ac=selective keeps."""

    active: ClassVar[list[_Recorder]] = []

    def __init__(self, running: list[int | None]) -> None:
        super().__init__()
        self.running = running
        self.outputs: dict[int, dict[int, int]] = {}
        self.alive: list[torch.Tensor] = []

    def record(self, tensors: object) -> None:
        if self.running[0] is None:
            return
        found = self.outputs.setdefault(self.running[0], {})
        for tensor in tensors if isinstance(tensors, (tuple, list)) else (tensors,):
            if isinstance(tensor, torch.Tensor):
                self.alive.append(tensor)  # a freed storage's address would be reused: keys must stay unique
                found[hash(StorageWeakRef(tensor.untyped_storage()))] = tensor.untyped_storage().nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in SAVED_OPS:
            self.record(out)
        return out

    def __enter__(self) -> _Recorder:
        _Recorder.active.append(self)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        _Recorder.active.remove(self)
        super().__exit__(*exc)


def _fake_parameters(model: nn.Module, mode: FakeTensorMode) -> None:
    """Make the parameters fake once, so every use (and every view, like a transposed weight) shares one fake
    storage that can be told apart from activations."""
    for module in model.modules():
        for name, param in direct_parameters(module):
            if param is not None:
                set_parameter(module, name, nn.Parameter(mode.from_tensor(param), requires_grad=param.requires_grad))


def profile(
    model: nn.Module, layer_cls: tuple[type[nn.Module], ...], batch_shapes: dict[str, tuple[int, ...]], samples: int
) -> ActivationProfile:
    """Trace one forward of ``model`` (built on meta in the compute dtype) on a batch of these shapes.

    The model's parameters are replaced by fake ones: pass a throwaway meta model."""
    saved: dict[StorageWeakRef, tuple[int | None, int]] = {}
    inputs: dict[int, dict[int, int]] = {}
    alive: list[torch.Tensor] = []
    running: list[int | None] = [None]
    found = layers(model, layer_cls)
    order = {id(layer): index for index, layer in enumerate(found)}

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        index = running[0] = order[id(module)]
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.is_floating_point()]
        alive.extend(tensors)  # storages are told apart by address: none may be freed and reused during the trace
        inputs[index] = {hash(StorageWeakRef(t.untyped_storage())): t.untyped_storage().nbytes() for t in tensors}

    def leave(*_: object) -> None:
        running[0] = None

    hooks = [layer.register_forward_pre_hook(enter, with_kwargs=True) for layer in found]
    hooks += [layer.register_forward_hook(leave) for layer in found]
    # The fake-tensor dispatch cache is shared by every FakeTensorMode in the process: an output it serves may
    # not share the storage its inputs do, which hides a tensor that several layers receive (the count then
    # depends on what was traced before). Storage identity is what this profile counts, so no cache.
    mode = fake_mode(cache=False)
    recorder = _Recorder(running)
    try:
        with mode, _gpu_like_attention():
            _fake_parameters(model, mode)
            params = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                key = StorageWeakRef(tensor.untyped_storage())
                if key not in params and key not in saved:
                    saved[key] = (running[0], tensor.untyped_storage().nbytes())
                return tensor

            batch = {name: torch.zeros(shape, dtype=torch.long, device="meta") for name, shape in batch_shapes.items()}
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), recorder:
                token_loss(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    per_layer = [0.0] * len(found)
    outside = 0.0
    for layer, size in saved.values():
        if layer is None:
            outside += size
        else:
            per_layer[layer] += size

    def per_sample(table: dict[int, dict[int, int]]) -> tuple[dict[int, float], ...]:
        return tuple({k: v / samples for k, v in table.get(i, {}).items()} for i in range(len(found)))

    return ActivationProfile(
        outside / samples, tuple(x / samples for x in per_layer), per_sample(inputs), per_sample(recorder.outputs)
    )
