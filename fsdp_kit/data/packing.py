"""Packed training rows: consecutive pairs of the sample stream, several per row, with segment ids.

The stream of pairs is the one ``GlobalBatchSampler`` walks (seeded epoch permutations, independent of the world
size). It is cut into rows greedily: a row takes the next pair while its source and target still fit in
``max_source_len`` and ``max_target_len`` tokens. A global batch is the next ``batch_size x world_size`` rows, and
rank r takes rows r*batch_size ... as it does unpacked, so one process with the global batch sees exactly the pairs
that N ranks see together. The data position is the number of pairs consumed (``TrainState.samples_seen``): a
resumed run, at any world size, cuts the same rows from there on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from fsdp_kit.data.loader import (
    Collator,
    Example,
    GlobalBatchSampler,
    SyntheticTokens,
    TextPairs,
    pad_rows,
    padded_length,
)
from fsdp_kit.models.objective import IGNORE_INDEX

PAIRS_KEY = "stream_pairs"
"""Batch entry (a 0-d tensor) holding the number of pairs the whole global batch consumed from the stream; the
trainer takes it out before the batch reaches the model."""


@dataclass(frozen=True)
class PackedRow:
    """One row's pairs (dataset indices) and the number of pairs its global batch consumed."""

    indices: tuple[int, ...]
    global_pairs: int


class PackedBatchSampler(GlobalBatchSampler):
    """Yields this rank's rows of each packed global batch; ``lengths(index)`` gives a pair's (source, target)
    token counts after truncation."""

    def __init__(
        self,
        lengths: Callable[[int], tuple[int, int]],
        limits: tuple[int, int],
        size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_sample: int = 0,
    ) -> None:
        super().__init__(size, batch_size, rank, world_size, seed, start_sample)
        self.lengths, self.limits = lengths, limits

    def __iter__(self) -> Iterator[list[PackedRow]]:  # type: ignore[override]  # rows of pairs, for PackedPairs
        position = self.start_sample
        while True:
            rows, position_after = self._rows(position, self.global_batch)
            consumed = position_after - position
            mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield [PackedRow(tuple(row), consumed) for row in mine]
            position = position_after

    def _rows(self, position: int, count: int) -> tuple[list[list[int]], int]:
        """``count`` rows cut from the stream at ``position``, and the position after them."""
        rows: list[list[int]] = []
        row: list[int] = []
        used = (0, 0)
        while True:
            index = self._sample(position)
            source, target = self.lengths(index)
            fits = used[0] + source <= self.limits[0] and used[1] + target <= self.limits[1]
            if row and not fits:
                rows.append(row)
                if len(rows) == count:
                    return rows, position
                row, used = [], (0, 0)
            row.append(index)
            used = (used[0] + source, used[1] + target)
            position += 1


class PackedPairs(Dataset):
    """Reads a ``PackedRow``: the tokenized pairs it names, from the unpacked dataset."""

    def __init__(self, pairs: TextPairs | SyntheticTokens) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, row: PackedRow) -> tuple[list[Example], int]:
        return [self.pairs[index] for index in row.indices], row.global_pairs


@dataclass(frozen=True)
class PackedCollator:
    """Concatenates each row's sources and targets; segment k (from 1) is the row's k-th pair, 0 is padding. Each
    target's decoder input starts with the decoder start token."""

    collate: Collator

    def __call__(self, rows: list[tuple[list[Example], int]]) -> dict[str, torch.Tensor]:
        fixed_source, fixed_target = self.collate.fixed_lengths or (None, None)
        sources = [[t for e in examples for t in e["source"]] for examples, _ in rows]
        targets = [[t for e in examples for t in e["target"]] for examples, _ in rows]
        start_id = self.collate.decoder_start_id
        assert start_id is not None  # packing is refused for models without a decoder start token
        starts = [[t for e in examples for t in [start_id, *e["target"][:-1]]] for examples, _ in rows]
        source_len = padded_length(max(map(len, sources)), fixed_source)
        target_len = padded_length(max(map(len, targets)), fixed_target)
        segment_ids = pad_rows([_segments(examples, "source") for examples, _ in rows], source_len, 0)
        return {
            "input_ids": pad_rows(sources, source_len, self.collate.pad_id),
            "attention_mask": (segment_ids > 0).long(),
            "segment_ids": segment_ids,
            "decoder_input_ids": pad_rows(starts, target_len, self.collate.pad_id),
            "decoder_segment_ids": pad_rows([_segments(examples, "target") for examples, _ in rows], target_len, 0),
            "labels": pad_rows(targets, target_len, IGNORE_INDEX),
            PAIRS_KEY: torch.tensor(rows[0][1]),
        }


def _segments(examples: list[Example], side: str) -> list[int]:
    return [segment for segment, example in enumerate(examples, 1) for _ in example[side]]


def take_stream_pairs(batch: dict[str, torch.Tensor]) -> int | None:
    """Remove and return the pairs a packed global batch consumed (None for an unpacked batch)."""
    count = batch.pop(PAIRS_KEY, None)
    return None if count is None else int(count)


def as_packed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An unpacked seq2seq batch as packed rows of one pair each: the packed forward (its 4-D masks included) at
    the same shapes, for the batch-size search."""
    return {
        **batch,
        "segment_ids": batch["attention_mask"].long(),
        "decoder_segment_ids": (batch["labels"] != IGNORE_INDEX).long(),
    }
