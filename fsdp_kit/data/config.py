"""Where training text comes from and how it is tokenized."""

from __future__ import annotations

from dataclasses import dataclass

from fsdp_kit.checks import check_fields
from fsdp_kit.errors import ConfigError
from fsdp_kit.options import Option


class DataSource(Option):
    builtin = "builtin"
    synthetic = "synthetic"
    csv = "csv"
    jsonl = "jsonl"
    hf = "hf"


@dataclass
class DataConfig:
    source: DataSource = DataSource.builtin
    """builtin (offline task generated from ``seed``) | synthetic (random fixed-length tokens, for speed
    runs) | csv | jsonl | hf (a HF dataset by name; needs network and the ``datasets`` package)."""
    path: str | None = None
    """csv/jsonl: file to read."""
    source_column: str = "text"
    """Column holding the input text (wikihow layout: text)."""
    target_column: str = "headline"
    """Column holding the target text (wikihow layout: headline)."""
    hf_name: str | None = None
    """hf: dataset name on the hub."""
    hf_config_name: str | None = None
    """hf: dataset configuration name."""
    hf_split: str = "train"
    """hf: split to train on."""
    source_prefix: str = ""
    """Text put before every source, e.g. 'summarize: ' for T5 checkpoints."""
    tokenizer: str = "byt5"
    """byt5 (byte-level, offline, no files) or a HF tokenizer name/path."""
    max_source_len: int = 128
    """Source tokens kept per example (truncation)."""
    max_target_len: int = 32
    """Target tokens kept per example (truncation)."""
    pad_to_max_length: bool = False
    """Pad every batch to the max lengths (fixed shapes); otherwise to the batch's longest, rounded to 8."""
    num_examples: int = 20_000
    """builtin/synthetic: number of training examples."""
    eval_examples: int = 256
    """Held-out examples (the last ones of the file, or freshly generated for builtin)."""
    seed: int = 0
    """Seed of the built-in task and of the shuffling order."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    pin_memory: bool = True
    """On GPU, load batches into pinned host memory so their copies to the GPU do not block the host."""
    packing: bool = False
    """Pack several (source, target) pairs into each training row (up to max_source_len source and max_target_len
    target tokens), with attention block-diagonal per pair: less padding, the same loss per target token. T5-family
    models only (sdpa or eager attention); eval batches stay unpacked."""
    max_skipped_fraction: float = 0.01
    """csv/jsonl/hf: the largest share of rows that may be skipped (empty or non-text source/target) before
    the run refuses to start; every skip is counted and reported either way. 0 allows none, 1 any."""

    def check(self, prefix: str = "data.") -> None:
        """Each setting finite and in its range (``prefix``: where this config sits in the job)."""
        check_fields(
            self,
            prefix,
            {
                "max_source_len": ">0",
                "max_target_len": ">0",
                "num_examples": ">0",
                "eval_examples": ">0",
                "num_workers": ">=0",
                "max_skipped_fraction": "[0,1]",
            },
        )


PACKABLE_MODEL_TYPES = ("t5", "mt5")
"""Encoder-decoders whose stacks take 4-D attention masks and whose positions are relative (T5's bias depends only on
the key-query distance), so a block-diagonal mask gives each packed pair exactly its unpacked result."""

PACKABLE_ATTENTION = (None, "sdpa", "eager")


def check_packing(cfg: DataConfig, model_type: str, attn_implementation: str | None) -> None:
    """Refuse ``data.packing=true`` for a model that cannot keep packed pairs apart."""
    if not cfg.packing:
        return
    if model_type not in PACKABLE_MODEL_TYPES:
        raise ConfigError(
            f"data.packing=true needs a T5-family encoder-decoder ({', '.join(PACKABLE_MODEL_TYPES)}); "
            f"this model is {model_type!r}, whose attention cannot keep packed pairs apart",
            "set data.packing=false for this model",
        )
    if attn_implementation not in PACKABLE_ATTENTION:
        raise ConfigError(
            f"data.packing=true needs attention that takes 4-D masks (sdpa or eager), not "
            f"model.attn_implementation={attn_implementation}",
            "set model.attn_implementation=sdpa, or data.packing=false",
        )
