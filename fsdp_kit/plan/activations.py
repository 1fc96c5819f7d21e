"""Activation memory, measured rather than guessed: the bytes autograd saves for backward, per sample.

The model runs forward on fake meta tensors (no memory, no compute) under ``saved_tensors_hooks``; every
saved tensor's storage is counted once, parameters excluded, and attributed to the transformer layer that
was running. Attention is swapped for a stand-in that saves what GPU memory-efficient/flash attention saves
(q, k, v, output, log-sum-exp, and the bias when there is one), because the math fallback that meta tensors
take would store the full score matrices that GPU kernels never materialize.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from fsdp_kit.models.build import layers
from fsdp_kit.models.objective import token_loss


@dataclass(frozen=True)
class ActivationProfile:
    """Per-sample bytes for one batch shape."""

    outside_layers: float
    """Saved outside the transformer layers (embeddings, final norms, logits and loss)."""
    per_layer: tuple[float, ...]
    """Saved inside each layer, in execution order."""
    layer_inputs: tuple[dict[int, int], ...]
    """Each layer's tensor inputs as {storage id: bytes per sample} (what activation checkpointing keeps;
    tensors every layer receives, like T5's position bias, share one storage and count once)."""

    def saved(self, checkpointed: set[int]) -> float:
        """Bytes alive at the end of forward when the layers at these indices are checkpointed."""
        kept: dict[int, int] = {}
        for index in checkpointed:
            kept.update(self.layer_inputs[index])
        return self.outside_layers + sum(kept.values()) + sum(
            size for index, size in enumerate(self.per_layer) if index not in checkpointed)

    def backward_working_set(self, checkpointed: set[int]) -> float:
        """Extra bytes while one layer runs backward: its recomputed activations (if checkpointed) and the
        gradients of its activations, about one more layer's worth."""
        if not self.per_layer:
            return 0.0
        largest = max(self.per_layer)
        return largest * (2 if checkpointed else 1)


class _SavedLikeEfficientAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, bias):  # type: ignore[override]
        output = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, lse, *(() if bias is None else (bias,)))
        return output

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        query, key, value = ctx.saved_tensors[:3]
        bias_grad = torch.zeros_like(ctx.saved_tensors[5]) if len(ctx.saved_tensors) > 5 else None
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value), bias_grad


@contextmanager
def _gpu_like_attention() -> Iterator[None]:
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        bias = attn_mask if attn_mask is not None and attn_mask.is_floating_point() else None
        return _SavedLikeEfficientAttention.apply(query, key, value, bias)

    F.scaled_dot_product_attention = attention
    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        torch.nn.functional.scaled_dot_product_attention = original


def _fake_parameters(model: nn.Module, mode: FakeTensorMode) -> None:
    """Make the parameters fake once, so every use (and every view, like a transposed weight) shares one fake
    storage that can be told apart from activations."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(mode.from_tensor(param), requires_grad=param.requires_grad)


def profile(model: nn.Module, layer_cls: tuple[type[nn.Module], ...], batch_shapes: dict[str, tuple[int, ...]],
            samples: int) -> ActivationProfile:
    """Trace one forward of ``model`` (built on meta in the compute dtype) on a batch of these shapes.

    The model's parameters are replaced by fake ones: pass a throwaway meta model."""
    saved: dict[StorageWeakRef, tuple[int | None, int]] = {}
    inputs: dict[int, dict[int, int]] = {}
    running: list[int | None] = [None]
    found = layers(model, layer_cls)
    order = {id(layer): index for index, layer in enumerate(found)}

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        running[0] = order[id(module)]
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.is_floating_point()]
        inputs[running[0]] = {hash(StorageWeakRef(t.untyped_storage())): t.untyped_storage().nbytes()
                              for t in tensors}

    def leave(*_: object) -> None:
        running[0] = None

    hooks = [layer.register_forward_pre_hook(enter, with_kwargs=True) for layer in found]
    hooks += [layer.register_forward_hook(leave) for layer in found]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
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
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
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
    return ActivationProfile(outside / samples, tuple(x / samples for x in per_layer),
                             tuple({k: v / samples for k, v in inputs.get(i, {}).items()} for i in range(len(found))))
