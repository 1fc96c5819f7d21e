"""Can a folder of results be written? Asked before the work that produces them, so that minutes of measuring or
exporting are never lost to an output path a user mistyped."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fsdp_kit.errors import ConfigError, FsdpKitError


def nearest_existing(path: Path) -> Path:
    """``path`` itself, or the closest folder above it that exists (where it would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(folder: Path, flag: str, error: type[FsdpKitError] = ConfigError) -> None:
    """``folder`` is, or can be created as, a folder this process can write into; nothing is left behind.

    ``flag`` names the option the path came from, for the message."""
    if folder.exists() and not folder.is_dir():
        raise error(f"{flag} {folder} is a file, not a folder", f"pass {flag} a folder path; nothing was written")
    base = nearest_existing(folder)
    if not base.is_dir():
        raise error(
            f"{flag} {folder} would be inside {base}, which is a file",
            f"pass {flag} a folder path; nothing was written",
        )
    try:
        with tempfile.TemporaryFile(dir=base):  # the only reliable test (ACLs, read-only mounts, root)
            pass
    except OSError as err:
        raise error(
            f"{flag} {folder}: {base} is not writable ({err.strerror})",
            f"pass {flag} a folder you can write; nothing was written",
        ) from err
