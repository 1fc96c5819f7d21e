"""The speed levers ``fsdp-kit bench`` ablates: data, one entry per lever.

A lever is a name, the overrides that turn it off and on (applied on top of the bench's base recipe and the user's
overrides), the factor a publication reports for it (with its source, or none), and the pair of runs of our own
GPU probe (``benchmarks/results/gpu_probe_*.json``, by label) whose ratio is the factor we measured. Adding a lever
is adding an entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fsdp_kit.errors import ConfigError

FSDP_T5_TUTORIAL = (
    "PyTorch 'Advanced Model Training with FSDP' (HF T5; Wright, Shojanazeri et al.): "
    "'up to 4x speed up by using BFloat16'"
)


@dataclass(frozen=True)
class Published:
    factor: float
    qualifier: str
    """How the source states it, e.g. "up to"."""
    source: str


@dataclass(frozen=True)
class Lever:
    name: str
    what: str
    off: tuple[str, ...]
    on: tuple[str, ...]
    published: Published | None = None
    probe: tuple[str, str] | None = None
    """Labels of the (off, on) runs in our GPU probe record, whose TFLOPS ratio is our measured factor."""


# The base recipe is the blog's tuned one (bf16 mixed, transformer wrap, full AC); each lever moves one switch.
BASE = ("precision=bf16", "wrap=transformer", "ac=full", "trainer.compile=false")

LEVERS: tuple[Lever, ...] = (
    Lever(
        "bf16",
        "bf16 mixed precision vs fp32",
        ("precision=fp32",),
        ("precision=bf16",),
        Published(4.0, "up to", FSDP_T5_TUTORIAL),
    ),
    Lever(
        "bf16_pure",
        "pure bf16 + AnyPrecision AdamW (Kahan) vs bf16 mixed + AdamW",
        ("precision=bf16", "optim=adamw"),
        ("precision=bf16_pure", "optim=anyprecision", "optim.use_kahan_summation=true"),
        probe=("bf16 mixed, wrap, full AC", "pure bf16 + AdamW, wrap, full AC"),
    ),
    Lever(
        "ac",
        "full activation checkpointing vs none (at each one's largest batch)",
        ("ac=none",),
        ("ac=full",),
        probe=("bf16 mixed, T5Block wrap, no AC", "bf16 mixed, wrap, full AC"),
    ),
    Lever(
        "wrap_transformer",
        "one FSDP unit per transformer block vs one for the whole model",
        ("wrap=none",),
        ("wrap=transformer",),
    ),
    Lever("wrap_size", "size-based FSDP units vs one for the whole model", ("wrap=none",), ("wrap=size",)),
    Lever(
        "compile",
        "torch.compile of each block vs eager",
        ("trainer.compile=false",),
        ("trainer.compile=true",),
        probe=("bf16 mixed, wrap, full AC", "bf16 mixed, wrap, full AC, blocks compiled"),
    ),
    Lever("selective_ac", "selective activation checkpointing vs full", ("ac=full",), ("ac=selective",)),
    Lever(
        "keep_last_unit",
        "last unit kept unsharded after forward vs resharded",
        ("sharding.reshard_last_unit=true",),
        ("sharding.reshard_last_unit=false",),
    ),
    Lever(
        "prefetch",
        "explicit all-gather prefetch of the next unit vs FSDP2's implicit",
        ("sharding.prefetch=0",),
        ("sharding.prefetch=1",),
    ),
    Lever(
        "optim_chunks",
        "AnyPrecision in 128M-element chunks vs 16M",
        ("precision=bf16_pure", "optim=anyprecision", "optim.chunk_elements=16777216"),
        ("precision=bf16_pure", "optim=anyprecision", "optim.chunk_elements=134217728"),
    ),
    Lever(
        "sdpa",
        "scaled_dot_product_attention vs eager attention",
        ("model.attn_implementation=eager",),
        ("model.attn_implementation=sdpa",),
    ),
    Lever(
        "grad_accum_no_sync",
        "one reduce-scatter per step vs one per micro-batch (grad_accum=4)",
        ("trainer.grad_accum=4", "trainer.grad_accum_no_sync=false"),
        ("trainer.grad_accum=4", "trainer.grad_accum_no_sync=true"),
    ),
    Lever(
        "packing",
        "several built-in pairs per row (data.packing) vs one pair per padded row; read the tokens of text per second",
        ("data=builtin", "data.packing=false"),
        ("data=builtin", "data.packing=true"),
    ),
    Lever(
        "pinned_batches",
        "pinned host batches with non-blocking copies vs pageable",
        ("data.pin_memory=false",),
        ("data.pin_memory=true",),
    ),
)


def select(names: list[str] | None) -> list[Lever]:
    """The levers named (all when None), in the order given; an unknown name is a ConfigError."""
    if not names:
        return list(LEVERS)
    known = {lever.name: lever for lever in LEVERS}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"unknown lever {unknown[0]!r}", f"pick from {', '.join(known)} (--levers a,b)")
    return [known[name] for name in names]
