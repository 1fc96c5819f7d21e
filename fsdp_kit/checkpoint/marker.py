"""The marker ``fsdp_kit.json``: what a committed checkpoint records, written last and verified on every read.

The marker carries a CRC-32 of its own bytes (the key ``marker_crc32``, written last, its value taken as
``00000000`` while hashing), so one flipped bit anywhere in the file (a value, a key name, the checksums of the
shards) is refused instead of silently changing an exported config or turning shard verification off. Markers
written before that field existed hold only ``LEGACY_KEYS``: they still load, with a warning. A marker with any
other key and no valid self-checksum (for example a flipped bit in the name ``marker_crc32`` itself) is corrupt,
and so is one that names a checksum method but holds no checksums: verification never fails open.
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

from fsdp_kit.errors import CheckpointError

MARKER = "fsdp_kit.json"
SELF_KEY = "marker_crc32"
_PLACEHOLDER = "00000000"
_SELF_FIELD = re.compile(rb'"marker_crc32": "([0-9a-f]{8})"')
# every key a marker had before it verified itself (fsdp_kit <= the timeline change)
LEGACY_KEYS = frozenset(
    {
        "step",
        "samples_seen",
        "world_size",
        "reason",
        "saved_at",
        "fsdp_kit",
        "torch",
        "model_name",
        "hf_config",
        "tokenizer",
        "param_shapes",
        "training",
        "checksum",
        "checksums",
    }
)
_warned: set[Path] = set()


def marker_text(meta: dict[str, Any]) -> str:
    """The marker's JSON with its own CRC-32 as the last key."""
    body = {key: value for key, value in meta.items() if key != SELF_KEY}
    text = json.dumps({**body, SELF_KEY: _PLACEHOLDER}, indent=1)
    crc = f"{zlib.crc32(text.encode()):08x}"
    head, _, tail = text.rpartition(f'"{SELF_KEY}": "{_PLACEHOLDER}"')
    return f'{head}"{SELF_KEY}": "{crc}"{tail}'


def read_marker(path: Path, warn_legacy: bool = True) -> dict[str, Any]:
    """The checkpoint's ``fsdp_kit.json``, verified, or a CheckpointError naming what is wrong with the folder."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist", "pass an existing <run_dir>/checkpoints/step_<N>")
    if path.name.endswith(".partial"):
        raise CheckpointError(
            f"{path} is an incomplete save (interrupted before it was committed)",
            "resume from a step_<N> folder without .partial",
        )
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(
            f"{marker} is missing, so {path} is not a complete fsdp_kit checkpoint",
            "pick a complete step_<N> folder (each holds fsdp_kit.json)",
        )
    try:
        raw = marker.read_bytes()
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{marker} is corrupt ({err})", "pick another checkpoint") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{marker} is corrupt (not a JSON object)", "pick another checkpoint")
    legacy = _check_self(marker, raw, meta)
    if "checksum" in meta and not (isinstance(meta.get("checksums"), dict) and meta["checksums"]):
        raise CheckpointError(
            f"{marker} is corrupt: it names the checksum method {meta['checksum']!r} but holds no "
            "checksums, so its files cannot be verified",
            "pick another checkpoint",
        )
    if not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path / '.metadata'} is missing (the DCP index of the shards)", "pick another checkpoint"
        )
    if legacy and warn_legacy and marker not in _warned:
        _warned.add(marker)
        warnings.warn(
            f"{marker} was written before markers carried their own checksum: a damaged marker cannot be detected",
            stacklevel=2,
        )
    return meta


def _check_self(marker: Path, raw: bytes, meta: dict[str, Any]) -> bool:
    """Refuse a marker whose bytes do not match its own checksum; True for a marker from before that checksum."""
    found = list(_SELF_FIELD.finditer(raw))
    if not found:
        unknown = sorted(set(meta) - LEGACY_KEYS)
        if unknown:  # written by a version that verifies its markers: the checksum's own key was damaged
            raise CheckpointError(
                f"{marker} is corrupt: it holds no valid {SELF_KEY} (unexpected key {unknown[0]!r})",
                "pick another checkpoint",
            )
        return True
    last = found[-1]
    zeroed = raw[: last.start(1)] + _PLACEHOLDER.encode() + raw[last.end(1) :]
    if len(found) > 1 or f"{zlib.crc32(zeroed):08x}" != last.group(1).decode():
        raise CheckpointError(
            f"{marker} is corrupt: its content does not match its own checksum ({SELF_KEY})",
            "pick another checkpoint; this one's recorded settings cannot be trusted",
        )
    return False
