"""Training FLOPs of a step (forward + backward = 3x forward) from the shapes alone, for the model families whose
layers have a closed form: the check on what FlopCounterMode counts, and the planner's T5 estimate.

Dense layers cost 6 x (weights a token passes through) x tokens; attention adds its score and value products,
12 x layers x inner width x (query length x key length) per sample. Biases, norms and softmax are not matmuls and count
nothing, as in FlopCounterMode.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class EncoderDecoderDims:
    """The widths and depths the FLOPs of a T5-style encoder-decoder depend on."""

    d_model: int
    inner: int
    """heads x head width of every attention."""
    d_ff: int
    ff_mats: int
    """Matrices in the feed-forward: 2 (in, out), 3 when gated (T5 v1.1's gated GELU)."""
    enc_layers: int
    dec_layers: int
    vocab: int


def encoder_decoder_flops(dims: EncoderDecoderDims, batch: int, source_len: int, target_len: int) -> int:
    """Self-attention and feed-forward per layer; the decoder's cross-attention projects queries and outputs per
    target token, keys and values per source token; the head per target token."""
    d, inner = dims.d_model, dims.inner
    attn = 4 * d * inner
    enc_block = attn + dims.ff_mats * d * dims.d_ff
    xattn_kv = 2 * d * inner
    dec_block = 2 * attn + dims.ff_mats * d * dims.d_ff
    dense = (
        dims.enc_layers * enc_block * batch * source_len
        + dims.dec_layers * (dec_block - xattn_kv) * batch * target_len
        + dims.dec_layers * xattn_kv * batch * source_len
        + d * dims.vocab * batch * target_len
    )
    attention = (
        (dims.enc_layers * source_len**2 + dims.dec_layers * (target_len**2 + source_len * target_len)) * inner * batch
    )
    return 6 * dense + 12 * attention


def t5_closed_form_flops(config: PretrainedConfig, batch: int, source_len: int, target_len: int) -> int:
    """T5, T5 v1.1, mT5 and Flan-T5 (see DESIGN.md); the head counts the same tied or untied."""
    dims = EncoderDecoderDims(
        config.d_model,
        config.num_heads * config.d_kv,
        config.d_ff,
        3 if config.is_gated_act else 2,
        config.num_layers,
        config.num_decoder_layers,
        config.vocab_size,
    )
    return encoder_decoder_flops(dims, batch, source_len, target_len)


def _bart_flops(config: PretrainedConfig, batch: int, source_len: int, target_len: int) -> int | None:
    if config.encoder_ffn_dim != config.decoder_ffn_dim:
        return None
    dims = EncoderDecoderDims(
        config.d_model,
        config.d_model,
        config.encoder_ffn_dim,
        2,
        config.encoder_layers,
        config.decoder_layers,
        config.vocab_size,
    )
    return encoder_decoder_flops(dims, batch, source_len, target_len)


def _decoder_only_flops(config: PretrainedConfig, batch: int, seq_len: int, d_ff: int, ff_mats: int) -> int:
    """One sequence (the source, then the target) of ``seq_len`` tokens; grouped-query attention projects fewer
    keys and values but scores every query head."""
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    block = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + ff_mats * d * d_ff
    dense = (config.num_hidden_layers * block + d * config.vocab_size) * batch * seq_len
    attention = config.num_hidden_layers * heads * head_dim * seq_len**2 * batch
    return 6 * dense + 12 * attention


def closed_form_flops(config: PretrainedConfig, batch: int, source_len: int, target_len: int) -> int | None:
    """The closed form for ``config``'s family at these lengths (decoder-only models see source + target as one
    sequence), or None for a family without one here."""
    kind = config.model_type
    if kind in ("t5", "mt5"):
        return t5_closed_form_flops(config, batch, source_len, target_len)
    if kind == "bart":
        return _bart_flops(config, batch, source_len, target_len)
    if kind == "llama":  # SwiGLU: gate, up and down projections
        seq_len = source_len + target_len
        # The rotary angles are one small matmul per forward, frequencies x positions (no gradient, batch 1).
        rotary = 2 * (config.head_dim // 2) * seq_len
        return _decoder_only_flops(config, batch, seq_len, config.intermediate_size, 3) + rotary
    if kind == "gpt2":
        return _decoder_only_flops(config, batch, source_len + target_len, config.n_inner or 4 * config.n_embd, 2)
    return None
