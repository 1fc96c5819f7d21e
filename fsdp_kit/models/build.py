"""Build a HF model from a preset shape or a pretrained name/path, on any device (meta by default)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig, PreTrainedModel

from fsdp_kit.errors import ConfigError, first_line
from fsdp_kit.models.config import ModelConfig

_DROPOUT_SUFFIXES = ("dropout", "dropout_rate", "_pdrop", "dropout_prob")


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The HF config for ``cfg``: a preset's shape, or the pretrained model's own, with our overrides."""
    if cfg.pretrained:
        try:
            config = AutoConfig.from_pretrained(cfg.pretrained, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"model.pretrained={cfg.pretrained!r} cannot be loaded ({first_line(err)})",
                "pass a local folder holding config.json and weights, or a hub name reachable from this machine",
            ) from err
    else:
        try:
            config = AutoConfig.for_model(cfg.arch, **cfg.hf_config)
        except ValueError as err:
            raise ConfigError(f"model.arch={cfg.arch!r} is not a transformers model type",
                              "use a HF model_type such as t5 or gpt2") from err
    if cfg.dropout is not None:
        for key, value in config.to_dict().items():
            if key.endswith(_DROPOUT_SUFFIXES) and isinstance(value, float):
                setattr(config, key, cfg.dropout)
    # Training never uses the KV cache, and HF T5 breaks non-reentrant activation checkpointing with it.
    config.use_cache = False
    return config


def build(cfg: ModelConfig, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
          config: PretrainedConfig | None = None) -> PreTrainedModel:
    """An untrained model of ``cfg``'s architecture, allocated on ``device`` (meta: no memory)."""
    config = config or hf_config(cfg)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device(device):
        extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        try:
            model = auto.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **extra)
        except ValueError as err:
            if not extra:
                raise
            raise ConfigError(f"model.attn_implementation={cfg.attn_implementation}: {first_line(err, 120)}",
                              "use sdpa, eager or flex_attention, or leave it null") from err
    return model


def layer_classes(model: nn.Module, names: list[str] | None) -> tuple[type[nn.Module], ...]:
    """Resolve layer class names (default: the model's ``_no_split_modules``) against the model's modules."""
    present = {type(module).__name__: type(module) for module in model.modules()}
    wanted = list(names) if names else list(getattr(model, "_no_split_modules", None) or [])
    if not wanted:
        raise ConfigError(f"{type(model).__name__} declares no transformer layer class (_no_split_modules)",
                          "name it with wrap.layer_cls=[ClassName] or use wrap=size")
    missing = [name for name in wanted if name not in present]
    if missing:
        candidates = sorted(name for name in present if name.endswith(("Block", "Layer"))) or sorted(present)
        raise ConfigError(
            f"wrap.layer_cls names {', '.join(missing)}, which {type(model).__name__} does not have",
            f"use one of {', '.join(candidates)}, e.g. wrap.layer_cls=[{candidates[0]}]",
        )
    return tuple(present[name] for name in wanted if name in present)


def layers(model: nn.Module, layer_cls: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """The transformer layers, each as the module that stands in its parent (its AC wrapper, if any)."""
    wrapped_inside = {id(m._checkpoint_wrapped_module) for m in model.modules() if isinstance(m, CheckpointWrapper)}
    found = []
    for module in model.modules():
        inner = module._checkpoint_wrapped_module if isinstance(module, CheckpointWrapper) else module
        if isinstance(inner, layer_cls) and id(module) not in wrapped_inside:
            found.append(module)
    return found
