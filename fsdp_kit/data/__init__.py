"""Data: the built-in offline task, CSV/JSONL (wikihow layout), HF datasets, tokenizers, collation."""

from fsdp_kit.data.loader import DataBundle, GlobalBatchSampler, build

__all__ = ["DataBundle", "GlobalBatchSampler", "build"]
