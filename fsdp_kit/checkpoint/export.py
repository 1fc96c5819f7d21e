"""Turn a sharded DCP checkpoint into a HF ``save_pretrained`` folder, on one machine without a GPU.

The model is built on the meta device from the config the checkpoint recorded, allocated once on CPU,
and DCP reads the shards straight into it (no process group, no second copy of the weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from fsdp_kit.checkpoint.manager import corrupt_error, read_marker, verify
from fsdp_kit.data.tokenizer import build_tokenizer
from fsdp_kit.errors import CheckpointError, first_line


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    source, target = Path(checkpoint), Path(out_dir)
    meta = read_marker(source)
    check_target(target)
    bad = verify(source, meta)
    if bad:
        raise corrupt_error(source, bad)
    hf_config = dict(meta["hf_config"])
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    model.to_empty(device="cpu")
    state = model.state_dict()
    try:
        dcp.load({"model": state}, checkpoint_id=str(source), no_dist=True)
    except (Exception, CheckpointException) as err:  # DCP raises many types for damaged shards
        raise CheckpointError(f"reading the weights of {source} failed ({type(err).__name__}: "
                              f"{first_line(err)})", "export another checkpoint") from err
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(target)
    build_tokenizer(meta["tokenizer"]).save_pretrained(target)
    return target


def check_target(target: Path) -> None:
    """``target`` is a new or empty folder that can be created and written; nothing is written here."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file", "choose a new output folder; nothing was written")
    if target.is_dir() and any(target.iterdir()):
        raise CheckpointError(f"{target} exists and is not empty", "choose a new output folder; nothing was written")
    parent = target
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"{target} would be inside {parent}, which is a file",
                              "choose a new output folder; nothing was written")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"{parent} is not writable", "choose a writable output folder; nothing was written")
