"""HF safetensors shards written straight from a DCP checkpoint, one shard's tensors in memory at a time.

The model is built on the meta device (no memory) only to learn what ``save_pretrained`` would write: the names,
shapes and dtypes of its state dict without tied copies (transformers' own ``remove_tied_weights_from_state_dict``)
and the shard plan (huggingface_hub's ``split_torch_state_dict_into_shards``, the planner ``save_pretrained`` uses,
so the folder has its layout: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``). Each shard is then read from the checkpoint by ``dcp.load`` on a state dict that
holds only that shard's tensors (DCP reads them tensor by tensor from the ``.distcp`` files, converting to the dtype
asked for) and written by safetensors before the next shard is read. Peak memory is one shard (``max_shard_size``,
or the largest single tensor where that is bigger), not the model.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from transformers import PreTrainedModel
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from fsdp_kit.errors import CheckpointError, ConfigError, first_line

DEFAULT_MAX_SHARD_SIZE = "1GB"
"""Bounds export's memory: save_pretrained's own default (50GB) would hold all of T5-11B at once."""


def shard_bytes(size: int | str) -> int:
    """``size`` in bytes (an int, or "500MB" as save_pretrained's max_shard_size); a bad value is one line."""
    try:
        value = size if isinstance(size, int) else parse_size_to_int(size)
    except ValueError as err:
        raise ConfigError(
            f"--max-shard-size {size!r} is not a size ({first_line(err)})",
            "write it as a number with a unit, e.g. 500MB or 2GB",
        ) from err
    if value <= 0:
        raise ConfigError(f"--max-shard-size {size!r} is not positive", "write it as e.g. 500MB or 2GB")
    return value


def saved_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The (meta) tensors ``save_pretrained`` writes for ``model``: its state dict without tied copies."""
    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    return remove_tied_weights_from_state_dict(state, model)


def write_config(model: PreTrainedModel, folder: Path) -> None:
    """config.json (and generation_config.json) as ``save_pretrained`` writes them for ``model``'s dtype."""
    model.config.dtype = str(model.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)


def write_shards(source: Path, model: PreTrainedModel, folder: Path, max_shard_size: int | str) -> None:
    """Copy ``model``'s tensors (meta, in the dtypes to write) from the DCP checkpoint ``source`` into
    safetensors shards in ``folder`` (plus the index where there are several), one shard in memory at a time."""
    wanted = saved_tensors(model)
    split = split_torch_state_dict_into_shards(
        wanted, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        shard = {name: torch.empty(wanted[name].shape, dtype=wanted[name].dtype) for name in names}
        _load(source, shard)
        save_file(shard, folder / filename, metadata={"format": "pt"})
        del shard  # freed before the next shard is read
    if not split.is_sharded:
        return
    index = {
        "metadata": {"total_parameters": model.num_parameters(), **split.metadata},
        "weight_map": split.tensor_to_filename,
    }
    (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _load(source: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill ``tensors`` (named as in the model) from the checkpoint's model state, in this one process."""
    try:
        with _single_process_load():
            dcp.load({"model": tensors}, checkpoint_id=str(source), no_dist=True)
    except (Exception, CheckpointException) as err:  # DCP raises many types for damaged shards
        cause = _first_failure(err)
        raise CheckpointError(
            f"reading the weights of {source} failed ({type(cause).__name__}: {first_line(cause)})",
            "export another checkpoint",
        ) from err


def _first_failure(err: BaseException) -> BaseException:
    """What went wrong inside DCP: its CheckpointException's own text names only the ranks that failed."""
    failures = err.failures if isinstance(err, CheckpointException) else {}
    for exc, _traceback in failures.values():
        return exc
    return err


@contextmanager
def _single_process_load() -> Iterator[None]:
    """dcp.load warns on every call without a process group, even when told ``no_dist=True``: export reads
    on purpose in one process, so that one warning says nothing to its user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
