"""The training objective: summed token cross-entropy, so ranks can normalize by the global token count."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsdp_kit.models.packed import packed_logits

IGNORE_INDEX = -100


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of target tokens) for one local batch.

    Encoder-decoder batches carry ``decoder_input_ids`` (packed ones also segment ids); decoder-only batches carry
    ``input_ids`` and ``labels`` of the same length, shifted here. Padding in ``labels`` is -100 and never counts.
    """
    labels = batch["labels"]
    if "segment_ids" in batch:
        logits = packed_logits(model, batch)
    else:
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    if "decoder_input_ids" not in batch:
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss_sum = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()
