"""Tokenizers: ByT5's byte-level one (no files, works offline) or any HF tokenizer by name/path."""

from __future__ import annotations

from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from fsdp_kit.errors import ConfigError, first_line


def build_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name == "byt5":
        return ByT5Tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer={name!r} cannot be loaded ({first_line(err)})",
                          "use data.tokenizer=byt5 (offline), a local tokenizer folder or a hub name") from err
