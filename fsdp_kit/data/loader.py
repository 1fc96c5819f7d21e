"""Tokenized datasets, padding, and a sampler that gives each rank its slice of every global batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from fsdp_kit.data.config import DataConfig, check_packing
from fsdp_kit.data.sources import Pair, load_pairs
from fsdp_kit.data.tokenizer import build_tokenizer
from fsdp_kit.errors import ConfigError
from fsdp_kit.models.objective import IGNORE_INDEX

Example = dict[str, list[int]]


class TextPairs(Dataset):
    """(source, target) strings, tokenized on access (so large files cost no up-front pass)."""

    def __init__(self, pairs: list[Pair], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> None:
        self.pairs, self.tokenizer, self.cfg = pairs, tokenizer, cfg
        self._lengths: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Example:
        source, target = self.pairs[index]
        source_ids = self.tokenizer(
            self.cfg.source_prefix + source, truncation=True, max_length=self.cfg.max_source_len
        )["input_ids"]
        target_ids = self.tokenizer(target, truncation=True, max_length=self.cfg.max_target_len)["input_ids"]
        return {"source": source_ids, "target": target_ids}

    def lengths(self, index: int) -> tuple[int, int]:
        """(source, target) token counts of pair ``index`` after truncation (packing cuts rows by them)."""
        if index not in self._lengths:
            example = self[index]
            self._lengths[index] = (len(example["source"]), len(example["target"]))
        return self._lengths[index]


class SyntheticTokens(Dataset):
    """Random token ids of fixed lengths, a pure function of (seed, index): for speed runs."""

    def __init__(self, count: int, cfg: DataConfig, vocab_size: int, seed: int) -> None:
        self.count, self.cfg, self.vocab_size, self.seed = count, cfg, vocab_size, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Example:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        source = torch.randint(2, self.vocab_size, (self.cfg.max_source_len,), generator=generator)
        target = torch.randint(2, self.vocab_size, (self.cfg.max_target_len,), generator=generator)
        return {"source": source.tolist(), "target": target.tolist()}

    def lengths(self, index: int) -> tuple[int, int]:
        return self.cfg.max_source_len, self.cfg.max_target_len


@dataclass(frozen=True)
class Collator:
    """Pads a list of examples into model inputs; label padding is -100 so it never counts in the loss."""

    pad_id: int
    is_encoder_decoder: bool
    decoder_start_id: int | None
    fixed_lengths: tuple[int, int] | None = None

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if self.is_encoder_decoder:
            return self._seq2seq(examples)
        return self._causal(examples)

    def _seq2seq(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        fixed_src, fixed_tgt = self.fixed_lengths or (None, None)
        src_len = padded_length(max(len(e["source"]) for e in examples), fixed_src)
        tgt_len = padded_length(max(len(e["target"]) for e in examples), fixed_tgt)
        input_ids = pad_rows([e["source"] for e in examples], src_len, self.pad_id)
        labels = pad_rows([e["target"] for e in examples], tgt_len, IGNORE_INDEX)
        decoder_input_ids = torch.full_like(labels, self.pad_id)
        decoder_input_ids[:, 0] = self.decoder_start_id  # type: ignore[assignment]  # only seq2seq models get here
        decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": _mask([e["source"] for e in examples], src_len),
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
        }

    def _causal(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        joined = [e["source"] + e["target"] for e in examples]
        fixed = sum(self.fixed_lengths) if self.fixed_lengths else None
        length = padded_length(max(map(len, joined)), fixed)
        input_ids = pad_rows(joined, length, self.pad_id)
        labels = pad_rows([[IGNORE_INDEX] * len(e["source"]) + e["target"] for e in examples], length, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": _mask(joined, length), "labels": labels}

    def prompts(self, examples: list[Example], device: torch.device) -> dict[str, torch.Tensor]:
        """Generation inputs: sources only (left-padded for decoder-only models, which continue them)."""
        sources = [e["source"] for e in examples]
        length = max(map(len, sources))
        if self.is_encoder_decoder:
            input_ids, mask = pad_rows(sources, length, self.pad_id), _mask(sources, length)
        else:
            flipped = [row[::-1] for row in sources]
            input_ids = pad_rows(flipped, length, self.pad_id).flip(1)
            mask = _mask(flipped, length).flip(1)
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, torch.Tensor]:
    """(tokens the model processed, of which not padding) for throughput numbers. The second stays a
    tensor on the batch's device: reading it would be a host sync, so the tracker does that at log steps."""
    total = batch["input_ids"].numel() + (batch["decoder_input_ids"].numel() if "decoder_input_ids" in batch else 0)
    real = batch["attention_mask"].sum()
    if "decoder_input_ids" in batch:
        real = real + (batch["labels"] != IGNORE_INDEX).sum()
    return total, real


def padded_length(longest: int, fixed: int | None) -> int:
    """``fixed`` if given, else the longest row rounded up to a multiple of 8."""
    return fixed if fixed is not None else -(-longest // 8) * 8


def pad_rows(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:length], dtype=torch.long)
    return out


def _mask(rows: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : min(len(row), length)] = 1
    return out


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's slice of each global batch from an endless stream of seeded epoch permutations.

    The stream depends only on (seed, data size), never on the world size: one process with the global
    batch sees exactly the examples that N ranks see together, and a run resumes at a sample offset even
    when the world size (hence the global batch) changed.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int, world_size: int, seed: int, start_sample: int = 0
    ) -> None:
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.start_sample = seed, start_sample
        self.global_batch = batch_size * world_size
        self._epoch, self._order = -1, list[int]()  # a list: reading a tensor element per sample costs a dispatch

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start_sample + self.rank * self.batch_size
        while True:
            yield [self._sample(position + offset) for offset in range(self.batch_size)]
            position += self.global_batch

    def _sample(self, position: int) -> int:
        epoch, index = divmod(position, self.size)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return self._order[index]


class EvalBatchSampler(Sampler[list[int]]):
    """One pass over the held-out set in order: this rank's slice of each full global batch."""

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int) -> None:
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in range(len(self)):
            start = (batch * self.world_size + self.rank) * self.batch_size
            yield list(range(start, start + self.batch_size))


@dataclass
class DataBundle:
    """What the trainer needs from the data layer."""

    train: TextPairs | SyntheticTokens
    eval: TextPairs | SyntheticTokens
    eval_pairs: list[Pair] | None
    collate: Collator
    tokenizer: PreTrainedTokenizerBase
    cfg: DataConfig
    report: list[str] = field(default_factory=list)
    """One line per split: rows read, kept and skipped by reason (empty for generated data)."""

    def train_loader(
        self, batch_size: int, rank: int, world_size: int, start_sample: int = 0, pin_memory: bool = False
    ) -> DataLoader:
        dataset: Dataset[Any] = self.train
        collate: Callable[[list[Any]], dict[str, torch.Tensor]] = self.collate
        sampler: Sampler[Any] = GlobalBatchSampler(
            len(self.train), batch_size, rank, world_size, self.cfg.seed, start_sample=start_sample
        )
        if self.cfg.packing:
            from fsdp_kit.data import packing  # it builds on this module's sampler and collator

            sampler = packing.PackedBatchSampler(
                self.train.lengths,
                (self.cfg.max_source_len, self.cfg.max_target_len),
                len(self.train),
                batch_size,
                rank,
                world_size,
                self.cfg.seed,
                start_sample=start_sample,
            )
            dataset, collate = packing.PackedPairs(self.train), packing.PackedCollator(self.collate)
        # Its own generator: creating the loader must not draw from the global RNG that dropout uses, or a
        # resumed run (which creates it after restoring the RNG) would shift every dropout mask.
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.cfg.num_workers,
            pin_memory=pin_memory,
            persistent_workers=self.cfg.num_workers > 0,
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def eval_loader(self, batch_size: int, rank: int, world_size: int) -> DataLoader:
        sampler = EvalBatchSampler(len(self.eval), batch_size, rank, world_size)
        if len(sampler) == 0:
            raise ConfigError(
                f"the held-out set has {len(self.eval)} examples, fewer than one global batch "
                f"({batch_size * world_size})",
                "raise data.eval_examples or lower trainer.batch_size",
            )
        return DataLoader(
            self.eval,
            batch_sampler=sampler,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )


def build(cfg: DataConfig, model_config: PretrainedConfig) -> DataBundle:
    """Tokenizer, train/eval datasets and the collator for ``model_config``'s kind of model."""
    check_packing(cfg, model_config.model_type, getattr(model_config, "_attn_implementation", None))
    tokenizer = build_tokenizer(cfg.tokenizer)
    vocab_size = model_config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the tokenizer {cfg.tokenizer!r} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}",
            "use a model preset with a larger vocab_size or a matching tokenizer",
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_config.pad_token_id
    if pad_id is None:
        raise ConfigError(
            f"the tokenizer {cfg.tokenizer!r} has no pad token and the model config names none",
            "use a tokenizer with a pad token (T5's and ByT5's have one)",
        )
    collate = Collator(
        pad_id=pad_id,
        is_encoder_decoder=model_config.is_encoder_decoder,
        decoder_start_id=getattr(model_config, "decoder_start_token_id", None),
        fixed_lengths=(cfg.max_source_len, cfg.max_target_len) if cfg.pad_to_max_length else None,
    )
    if cfg.source == "synthetic":
        train = SyntheticTokens(cfg.num_examples, cfg, vocab_size, cfg.seed)
        evaluation = SyntheticTokens(cfg.eval_examples, cfg, vocab_size, cfg.seed + 1)
        return DataBundle(train, evaluation, None, collate, tokenizer, cfg)
    loaded = load_pairs(cfg)
    return DataBundle(
        TextPairs(loaded.train, tokenizer, cfg),
        TextPairs(loaded.eval, tokenizer, cfg),
        loaded.eval,
        collate,
        tokenizer,
        cfg,
        loaded.report,
    )
