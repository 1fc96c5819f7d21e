"""Build a HF model from a preset shape or a pretrained name/path, on any device (meta by default)."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    PretrainedConfig,
    PreTrainedModel,
)

from fsdp_kit.errors import ConfigError, first_line
from fsdp_kit.models.config import ModelConfig
from fsdp_kit.torch_private import unwrap_checkpointed

if TYPE_CHECKING:
    from fsdp_kit.data.config import DataConfig

_DROPOUT_SUFFIXES = ("dropout", "dropout_rate", "_pdrop", "dropout_prob")


def hf_config(cfg: ModelConfig) -> PretrainedConfig:
    """The HF config for ``cfg``: a preset's shape, or the pretrained model's own, with our overrides."""
    if cfg.pretrained:
        check_pretrained(cfg.pretrained)
        try:
            config = AutoConfig.from_pretrained(cfg.pretrained, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"model.pretrained={cfg.pretrained!r} is no folder here and cannot be loaded from the hub "
                f"({first_line(err)})"
                if not Path(cfg.pretrained).expanduser().exists()
                else f"model.pretrained={cfg.pretrained!r} cannot be loaded ({first_line(err)})",
                "pass a local folder holding config.json and weights, or a hub name reachable from this machine",
            ) from err
    else:
        if cfg.arch not in CONFIG_MAPPING:
            raise ConfigError(
                f"model.arch={cfg.arch!r} is not a transformers model type", "use a HF model_type such as t5 or gpt2"
            )
        config_class = CONFIG_MAPPING[cfg.arch]
        check_hf_config(config_class, cfg.hf_config)
        try:
            config = config_class(**cfg.hf_config)
        except (ValueError, TypeError) as err:  # the config class's own consistency checks
            raise ConfigError(
                f"model.hf_config is not a valid {config_class.__name__} ({first_line(err)})",
                "fix the model.hf_config values",
            ) from err
    keep_untied_head(config, _asked_settings(cfg))
    if cfg.dropout is not None:
        for key, value in config.to_dict().items():
            if key.endswith(_DROPOUT_SUFFIXES) and isinstance(value, float):
                setattr(config, key, cfg.dropout)
    # Training never uses the KV cache, and HF T5 breaks non-reentrant activation checkpointing with it.
    config.use_cache = False
    return config


def keep_untied_head(config: PretrainedConfig, asked: dict[str, Any]) -> None:
    """Keep the language-model head untied from the embedding where the settings say so.

    transformers 5.x T5 and mT5 configs force ``tie_word_embeddings=True`` (T5 v1.1, mT5 and Flan-T5 checkpoints
    hold their own head, which from_pretrained keeps by comparing values), so a model built from the config alone
    would share one matrix for the embedding and the head: not the v1.1 architecture, and loading or exporting its
    weights would write both into that one matrix. Setting the attribute after construction builds the untied head.
    """
    if asked.get("tie_word_embeddings") is False and config.tie_word_embeddings:
        config.tie_word_embeddings = False


def tie_all_but_the_head(model: PreTrainedModel) -> None:
    """With the head untied, the model's other declared ties hold (T5's encoder and decoder embeddings are
    ``shared``): transformers ties nothing at all when ``tie_word_embeddings`` is false."""
    head = model.get_output_embeddings()
    if model.config.tie_word_embeddings or head is None:
        return
    head_name = next(name for name, module in model.named_modules() if module is head) + ".weight"
    ties = {target: source for target, source in (type(model)._tied_weights_keys or {}).items() if target != head_name}
    if ties:
        model.all_tied_weights_keys = ties  # what save_pretrained and tie_weights read
        model.tie_weights(recompute_mapping=False)


def _asked_settings(cfg: ModelConfig) -> dict[str, Any]:
    """The model settings as written: the preset's hf_config, or the pretrained folder's config.json."""
    if not cfg.pretrained:
        return cfg.hf_config
    return PretrainedConfig.get_config_dict(cfg.pretrained)[0]


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Settings of rotary/relative-position models: no learned position table, so no hard length limit.
_ROTARY_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rotary_dim", "rotary_pct")


def check_hf_config(config_class: type[PretrainedConfig], values: dict[str, Any]) -> None:
    """model.hf_config keys the config class knows, and sizes that can build a model: a misspelt key would
    otherwise be stored and ignored, and a zero size fails deep inside the model."""
    default = config_class()
    known = set(inspect.signature(config_class.__init__).parameters) | set(config_class.attribute_map)
    known |= set(default.to_dict()) | {name for name in dir(default) if not name.startswith("_")}
    for key, value in values.items():
        if key not in known and not key.endswith("_token_id"):
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(
                f"model.hf_config.{key} is not a setting of {config_class.__name__}"
                + (f" (did you mean {close[0]}?)" if close else ""),
                f"fix the key's spelling or drop model.hf_config.{key}",
            )
        was = getattr(default, key, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.endswith(_DROPOUT_SUFFIXES) and not 0 <= value < 1:
            raise ConfigError(
                f"model.hf_config.{key}={value} must be in [0, 1)",
                f"pass model.hf_config.{key}=<a probability, e.g. 0.1>",
            )
        # A size, count or scale whose default is positive (d_model, num_layers, layer_norm_epsilon, ...); a token
        # id is none of these (BART's pad id defaults to 1, and 0 is a valid id).
        if (
            not key.endswith((*_DROPOUT_SUFFIXES, "_token_id"))
            and isinstance(was, (int, float))
            and not isinstance(was, bool)
            and was > 0
            and value <= 0
        ):
            raise ConfigError(
                f"model.hf_config.{key}={value} must be > 0",
                f"pass model.hf_config.{key}=<a number > 0> (its default is {was})",
            )


def check_pretrained(name: str) -> None:
    """A local model folder exists and holds a config and readable weights (without reading the weights);
    a hub name is left to transformers."""
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if not looks_local:
        return
    if not path.is_dir():
        raise ConfigError(
            f"model.pretrained={name!r}: " + ("not a folder" if path.exists() else "the folder does not exist"),
            "pass a folder holding config.json and the weights (e.g. from save_pretrained), "
            "or a hub name such as google-t5/t5-small",
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.pretrained={name!r} has no config.json",
            "pass the folder that save_pretrained wrote (config.json and the weights)",
        )
    if not any((path / weights).is_file() for weights in _WEIGHT_FILES):
        raise ConfigError(
            f"model.pretrained={name!r} holds no weights (none of {', '.join(_WEIGHT_FILES)})",
            "copy the weights beside config.json, or use a model preset (model=t5_small) to start from random weights",
        )
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as handle:  # reads the header only
                handle.keys()
        except Exception as err:  # safetensors raises its own error types for a corrupt header
            raise ConfigError(
                f"model.pretrained: {weights} is not a readable safetensors file ({first_line(err)})",
                "copy the weights again (the file is truncated or corrupt)",
            ) from err


def check_fits(config: PretrainedConfig, data: DataConfig, max_new_tokens: int | None) -> None:
    """Sources and targets fit the model's learned position table, if it has one (T5's positions are
    relative: no limit)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or any(getattr(config, key, None) is not None for key in _ROTARY_KEYS):
        return
    generated = max(data.max_target_len, max_new_tokens or 0)
    if config.is_encoder_decoder:
        longest, what = max(data.max_source_len, generated + 1), "data.max_source_len and the target length"
    else:  # one sequence: the source, then the target (or the generated tokens)
        longest, what = (
            data.max_source_len + generated,
            "data.max_source_len + max(data.max_target_len, trainer.max_new_tokens)",
        )
    if longest > limit:
        raise ConfigError(
            f"{what} = {longest} tokens, more than the model's {limit} positions "
            f"({config.model_type} max_position_embeddings)",
            f"lower data.max_source_len/data.max_target_len to fit {limit}, or use a model with more positions",
        )


def build(
    cfg: ModelConfig,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    config: PretrainedConfig | None = None,
) -> PreTrainedModel:
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
            raise ConfigError(
                f"model.attn_implementation={cfg.attn_implementation}: {first_line(err, 120)}",
                "use sdpa, eager or flex_attention, or leave it null",
            ) from err
    tie_all_but_the_head(model)
    return model


def traceable(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` in training mode for tracing on fake tensors (FLOP counting, planning), except the stacks that can
    skip layers: BART's layerdrop draws a random number per layer and compares it on the host, which a fake tensor
    cannot. Those stacks then also skip their embedding dropout, one mask per stack: no FLOPs, negligible memory."""
    model.train()
    for module in model.modules():
        if hasattr(module, "layerdrop"):
            module.training = False
    return model


def layer_classes(model: nn.Module, names: list[str] | None) -> tuple[type[nn.Module], ...]:
    """Resolve layer class names (default: the model's ``_no_split_modules``) against the model's modules."""
    present = {type(module).__name__: type(module) for module in model.modules()}
    wanted = list(names) if names else list(getattr(model, "_no_split_modules", None) or [])
    if not wanted:
        raise ConfigError(
            f"{type(model).__name__} declares no transformer layer class (_no_split_modules)",
            "name it with wrap.layer_cls=[ClassName] or use wrap=size",
        )
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
    wrapped_inside = {id(unwrap_checkpointed(m)) for m in model.modules() if unwrap_checkpointed(m) is not m}
    found = []
    for module in model.modules():
        inner = unwrap_checkpointed(module)
        if isinstance(inner, layer_cls) and id(module) not in wrapped_inside:
            found.append(module)
    return found
