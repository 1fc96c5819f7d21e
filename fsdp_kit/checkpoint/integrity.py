"""Checksums of every file of a checkpoint, recorded in its marker at commit and verified before loading.

CRC-32 (zlib) rather than a cryptographic hash: it detects accidental corruption (bit rot, torn copies, a
truncated or edited shard), not tampering, and it is 3x faster than sha256: measured on this project's 2-core
AMD EPYC (loaded), a 2.15 GB file from the page cache hashes at 1.6 GB/s with crc32, 0.54 GB/s with sha256.
Every rank hashes the files it wrote, in parallel, so a save costs about (shard bytes per rank) / 1.6 GB/s
more. A checkpoint folder stays trusted input either way.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from pathlib import Path

ALGORITHM = "crc32"
_CHUNK = 8 << 20  # large reads keep the per-call overhead negligible


def file_checksum(path: Path) -> str:
    crc = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def mismatches(folder: Path, expected: dict[str, str], names: Iterable[str] | None = None) -> list[str]:
    """The files among ``names`` (default: all recorded) that are missing or whose checksum differs."""
    bad = []
    for name in expected if names is None else names:
        path = folder / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif file_checksum(path) != expected[name]:
            bad.append(f"{name} (checksum differs)")
    return bad
