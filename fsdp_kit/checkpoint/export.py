"""Turn a sharded DCP checkpoint into a HF ``save_pretrained`` folder, on one machine without a GPU.

The model is built on the meta device from the config the checkpoint recorded, never allocated: it only says what
``save_pretrained`` would write (names, dtypes, tied weights, config files). The weights are copied from the DCP shards
into HF safetensors shards one output shard at a time (see ``hf_shards``), so peak memory is one shard
(``max_shard_size``), not the model: no process group, no model copy.

Everything export needs (the marker's model config, a loadable tokenizer, a writable output folder) is checked
before a byte is written. The folder is written as a hidden sibling and renamed into place at the end, so a full
disk or a file-size limit leaves nothing that would block the retry.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerBase

from fsdp_kit.checkpoint.hf_shards import DEFAULT_MAX_SHARD_SIZE, shard_bytes, write_config, write_shards
from fsdp_kit.checkpoint.manager import corrupt_error, read_marker, verify
from fsdp_kit.data.tokenizer import build_tokenizer
from fsdp_kit.errors import CheckpointError, ConfigError, first_line
from fsdp_kit.models.build import keep_untied_head, tie_all_but_the_head
from fsdp_kit.outputs import check_writable_folder, nearest_existing


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``checkpoint`` as a HF folder at ``out_dir``; ``tokenizer`` replaces the one the checkpoint records;
    ``max_shard_size`` (bytes, or "500MB") bounds each safetensors file and so the memory export needs."""
    source, target = Path(checkpoint), Path(out_dir)
    shard_size = shard_bytes(max_shard_size)
    meta = read_marker(source)
    check_target(target)
    config = _model_config(source, meta)
    tokens = _tokenizer(source, meta, tokenizer)
    bad = verify(source, meta)
    if bad:
        raise corrupt_error(source, bad)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    tie_all_but_the_head(model)
    if dtype is not None:
        model.to(dtype)  # casts the floating-point tensors only, as it would a loaded model

    def save(folder: Path) -> None:
        folder.mkdir()
        write_config(model, folder)
        write_shards(source, model, folder, shard_size)
        tokens.save_pretrained(folder)

    _write(target, save)
    return target


def _model_config(source: Path, meta: dict[str, Any]) -> Any:
    """The HF config the checkpoint recorded; a marker without one cannot be exported."""
    recorded = meta.get("hf_config")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("model_type"), str):
        raise CheckpointError(
            f"{source}/fsdp_kit.json records no model config (hf_config with a model_type)",
            "export a checkpoint written by fsdp_kit train",
        )
    hf_config = dict(recorded)
    try:
        config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
        keep_untied_head(config, recorded)
        return config
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(
            f"{source}/fsdp_kit.json records a model config transformers cannot build ({first_line(err)})",
            "export with the transformers version that trained it",
        ) from err


def _tokenizer(source: Path, meta: dict[str, Any], override: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer to save beside the weights, loaded before anything is read or written."""
    name = override or meta.get("tokenizer")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{source}/fsdp_kit.json records no tokenizer", "pass --tokenizer NAME_OR_FOLDER")
    try:
        return build_tokenizer(name)
    except ConfigError as err:
        where = "--tokenizer" if override else f"the tokenizer {source} was trained with"
        raise CheckpointError(
            f"{where} ({name!r}) cannot be loaded from {Path.cwd()}; nothing was written",
            "pass --tokenizer with that tokenizer's folder or hub name (a relative path recorded "
            "by an older fsdp_kit is relative to the folder training ran in)",
        ) from err


def _write(target: Path, save: Any) -> None:
    """``save(folder)`` into a hidden sibling of ``target``, renamed to ``target`` once complete; on failure
    nothing is left behind (no half folder, no parent folders this export created)."""
    created = []
    for folder in reversed([target.parent, *target.parent.parents]):
        if not folder.exists():
            created.append(folder)
    staging = target.parent / f".{target.name}.export-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save(staging)
        if target.is_dir():
            target.rmdir()  # empty (check_target): os.replace cannot put a folder onto a folder
        os.replace(staging, target)
    except Exception as err:  # safetensors reports a full disk as its own error type, not OSError
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(err, CheckpointError):  # the checkpoint could not be read: nothing about the disk
            raise
        raise CheckpointError(
            f"writing {target} failed: {_why(err, target)}; nothing was left there",
            "free space (or raise the file-size limit, ulimit -f) and export again, or export to another disk",
        ) from err


def _why(err: BaseException, target: Path) -> str:
    """A write failure in words: the full disk or the file-size limit by name (safetensors' message buries
    them in a Rust debug string)."""
    code = getattr(err, "errno", None)
    text = str(err)
    if code == errno.ENOSPC or "StorageFull" in text or "No space left" in text:
        return f"no space left on {nearest_existing(target.parent)}"
    if code == errno.EFBIG or "FileTooLarge" in text or "File too large" in text:
        return "a file would exceed the file-size limit (ulimit -f)"
    return f"{type(err).__name__}: {first_line(err)}"


def check_target(target: Path) -> None:
    """``target`` is a new or empty folder that can be created and written; nothing is written here."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file", "choose a new output folder; nothing was written")
    if target.is_dir() and any(target.iterdir()):
        raise CheckpointError(f"{target} exists and is not empty", "choose a new output folder; nothing was written")
    check_writable_folder(target, "the output folder", error=CheckpointError)
