"""Tokenizers: ByT5's byte-level one (no files, works offline) or any HF tokenizer by name/path."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from fsdp_kit.errors import ConfigError, first_line


def build_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name == "byt5":
        return ByT5Tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"data.tokenizer={name!r} cannot be loaded ({first_line(err)})",
            "use data.tokenizer=byt5 (offline), a local tokenizer folder or a hub name",
        ) from err


def recorded_name(name: str) -> str:
    """``name`` as a checkpoint records it: a local folder as its absolute path (export, run from another folder,
    must find it again), anything else (byt5, a hub name) unchanged. HF loads a name from disk whenever such a
    folder exists, so this is the folder training used."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name
