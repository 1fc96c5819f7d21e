"""Data: the built-in offline task, CSV/JSONL (wikihow layout), HF datasets, tokenizers, collation.

This file imports nothing: importing ``fsdp_kit.data.config`` (what composing a config does) must not import torch
or transformers. Import from the modules: loader (build, DataBundle, GlobalBatchSampler), sources, tokenizer,
builtin; config is light.
"""
