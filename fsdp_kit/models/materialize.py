"""Fill a sharded meta-device model with weights, one transformer layer at a time.

Random init: for each layer (the model's ``_no_split_modules``), then for the rest of the model, the
parameters are allocated at full size and initialized by the model's own HF ``_init_weights`` (which
reaches only into a module's own layer), each module from a generator seeded by (seed, module name);
each rank keeps its shard. Every rank draws the same numbers, so the weights depend neither on the world
size nor on the wrapping, and memory peaks at one layer plus the embeddings.
Pretrained: rank 0 reads the checkpoint and torch broadcasts it into the shards.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedModel

from fsdp_kit.models.build import layers, tie_all_but_the_head
from fsdp_kit.models.config import ModelConfig
from fsdp_kit.torch_private import CHECKPOINT_WRAPPER_PREFIX, direct_parameters, set_parameter


def materialize(model: PreTrainedModel, cfg: ModelConfig, device: torch.device, rank: int, seed: int) -> None:
    """Allocate the local shards on ``device`` and fill them (random init or pretrained weights)."""
    model.to_empty(device=device)
    if cfg.pretrained:
        _load_pretrained(model, cfg, rank)
    else:
        _init_random(model, device, seed)
    model.train()


def _load_pretrained(model: PreTrainedModel, cfg: ModelConfig, rank: int) -> None:
    _init_unsaved_buffers(model)
    full_state: dict[str, Any] = {}
    if rank == 0:
        assert cfg.pretrained is not None  # the caller loads only a pretrained model
        dtype = next(model.parameters()).dtype
        auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
        source = auto.from_pretrained(
            cfg.pretrained, config=model.config, dtype=dtype, trust_remote_code=cfg.trust_remote_code
        )
        tie_all_but_the_head(source)
        full_state = {name: tensor.to(dtype) for name, tensor in source.state_dict().items()}
        del source
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _init_unsaved_buffers(model: PreTrainedModel) -> None:
    """Buffers no checkpoint holds (non-persistent: Llama's rotary frequencies) are computed by the model's own
    init, on every rank; to_empty left them as uninitialized memory."""
    with torch.no_grad():
        for module in model.modules():
            if module._non_persistent_buffers_set and next(module.parameters(recurse=False), None) is None:
                model._init_weights(module)


def _init_random(model: PreTrainedModel, device: torch.device, seed: int) -> None:
    generator_state = torch.random.get_rng_state()
    names = {id(module): name.replace(CHECKPOINT_WRAPPER_PREFIX, "") for name, module in model.named_modules()}
    groups = [*layers(model, _no_split_classes(model)), model]
    group_ids = {id(group) for group in groups}
    with torch.no_grad():
        for group in groups:
            modules = list(_post_order(group, group_ids))
            with _full_size_parameters(modules, device) as full:
                for module in modules:
                    # A seed per module name: the weights do not depend on the grouping or the world size.
                    torch.manual_seed(zlib.crc32(f"{seed}:{names[id(module)]}".encode()))
                    model._init_weights(module)
            for sharded, full_tensor in full:
                _copy_into_shard(sharded, full_tensor)
    torch.random.set_rng_state(generator_state)


def _no_split_classes(model: PreTrainedModel) -> tuple[type[nn.Module], ...]:
    wanted = set(getattr(model, "_no_split_modules", None) or [])
    return tuple({type(m) for m in model.modules() if type(m).__name__ in wanted})


def _post_order(module: nn.Module, stop_at: set[int]) -> Iterator[nn.Module]:
    """Children before parents (HF's init order), without entering other FSDP units."""
    for child in module.children():
        if id(child) not in stop_at:
            yield from _post_order(child, stop_at)
    yield module


@contextmanager
def _full_size_parameters(
    modules: list[nn.Module], device: torch.device
) -> Iterator[list[tuple[nn.Parameter, torch.Tensor]]]:
    """Temporarily replace the modules' sharded parameters with full-size plain ones (tied ones stay tied);
    yields (sharded parameter, full tensor) pairs."""
    full: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in modules:
        for name, param in direct_parameters(module):
            if param is None:
                continue
            if id(param) not in full:
                full[id(param)] = (param, torch.empty(param.shape, dtype=param.dtype, device=device))
            set_parameter(module, name, nn.Parameter(full[id(param)][1], requires_grad=False))
            swapped.append((module, name, param))
    try:
        yield list(full.values())
    finally:
        for module, name, param in swapped:
            set_parameter(module, name, param)


def _copy_into_shard(sharded: nn.Parameter, full_tensor: torch.Tensor) -> None:
    if isinstance(sharded, DTensor):
        # Every rank holds the same full tensor, so each can cut its own shard without communication.
        local = distribute_tensor(full_tensor, sharded.device_mesh, sharded.placements, src_data_rank=None)
        sharded.to_local().copy_(local.to_local())
    else:
        sharded.copy_(full_tensor)
