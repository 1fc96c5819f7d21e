"""The forward pass of a packed seq2seq batch: several (source, target) pairs per row, told apart by segment ids.

HF's T5 is used as it is: its encoder and decoder stacks each take a prepared 4-D additive mask (returned as-is
by transformers' mask builders), so encoder self-attention, causal decoder self-attention and cross-attention are
made block-diagonal per segment here. T5's relative position bias depends only on the key-query distance, so within
a segment it is exactly the unpacked one (tests/test_packing.py checks the loss and gradients against unpacked pairs).

Segment 0 is padding. A padding query attends to every key, so that no softmax row is empty (an empty one would be
NaN and poison the backward pass through 0 x NaN); its outputs are never in the loss.
"""

from __future__ import annotations

import types
from typing import cast

import torch
from torch import nn
from torch.distributed.fsdp import register_fsdp_forward_method
from transformers import PreTrainedModel

_METHOD = "fsdp_kit_packed_forward"
"""The packed forward as a method of the model: under FSDP2 it runs with the root's forward hooks (the root's
parameters unsharded, its gradients reduced), as ``generate`` does."""


def packed_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a packed batch (input_ids, segment_ids, decoder_input_ids, decoder_segment_ids)."""
    if not hasattr(model, _METHOD):
        setattr(model, _METHOD, types.MethodType(_forward, model))
        register_fsdp_forward_method(model, _METHOD)  # a no-op for a model that is not an FSDP module
    return getattr(model, _METHOD)(
        batch["input_ids"], batch["segment_ids"], batch["decoder_input_ids"], batch["decoder_segment_ids"]
    )


def _forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    decoder_segment_ids: torch.Tensor,
) -> torch.Tensor:
    encoder, decoder = model.get_encoder(), model.get_decoder()
    source_embeds = encoder.embed_tokens(input_ids)
    dtype = source_embeds.dtype  # the compute dtype (FSDP's param_dtype under mixed precision)
    encoded = encoder(
        inputs_embeds=source_embeds, attention_mask=_additive(_same_segment(segment_ids, segment_ids), dtype)
    ).last_hidden_state
    length = decoder_input_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=decoder_input_ids.device).tril()
    self_mask = _same_segment(decoder_segment_ids, decoder_segment_ids) & causal
    cross_mask = _same_segment(decoder_segment_ids, segment_ids)
    hidden = decoder(
        input_ids=decoder_input_ids,
        attention_mask=_additive(self_mask, dtype),
        encoder_hidden_states=encoded,
        encoder_attention_mask=_additive(cross_mask, dtype),
        use_cache=False,
    ).last_hidden_state
    # What T5ForConditionalGeneration.forward does after its decoder: a tied head sees rescaled outputs.
    if getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings):
        hidden = hidden * (cast(int, model.model_dim) ** -0.5)
    return cast(nn.Module, model.lm_head)(hidden)


def _same_segment(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(batch, 1, queries, keys): True where the query may attend to the key."""
    same = queries[:, :, None] == keys[:, None, :]
    return (same | (queries == 0)[:, :, None])[:, None]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive float mask: eager attention adds the mask to its scores, so a boolean one would be wrong there."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
