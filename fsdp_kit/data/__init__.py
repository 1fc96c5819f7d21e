"""Data: the built-in offline task, CSV/JSONL (wikihow layout), HF datasets, tokenizers, collation."""

from typing import TYPE_CHECKING

from fsdp_kit._lazy import export_lazily

__all__ = ["DataBundle", "GlobalBatchSampler", "build"]

# Imported on first use (fsdp_kit/_lazy.py): data.config alone must not import transformers.
export_lazily(__name__, {"DataBundle": "loader", "GlobalBatchSampler": "loader", "build": "loader"})

if TYPE_CHECKING:
    from fsdp_kit.data.loader import DataBundle, GlobalBatchSampler, build
