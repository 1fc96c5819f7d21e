"""Why a checkpoint write failed, in the user's terms.

DCP reports a full disk or a file over the file-size limit as torch.save's own assertion ("unexpected pos 704 vs
598"), with the OSError's errno lost on the way; what is left to look at is the folder and the file system.
"""

from __future__ import annotations

import errno
import resource
import shutil
from pathlib import Path

from fsdp_kit.errors import first_line

_NEARLY_FULL = 64 << 20  # free bytes under which a failed write is put down to a full disk


def write_failure(partial: Path, root: Path, err: BaseException) -> str:
    """Why writing into ``partial`` (a save under ``root``) failed, in the user's terms."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    sizes = [path.stat().st_size for path in partial.rglob("*") if path.is_file()] if partial.is_dir() else []
    if limit != resource.RLIM_INFINITY and any(size >= limit for size in sizes):
        return f"a file reached this process's file-size limit ({limit} bytes, ulimit -f) in {root}"
    if shutil.disk_usage(root).free < _NEARLY_FULL or _errno_in(err) == errno.ENOSPC:
        return f"no space left on {root}"
    return f"{type(err).__name__}: {first_line(err)}"


def _errno_in(err: BaseException | None) -> int | None:
    for _ in range(32):  # a chain of causes, bounded (a chain can loop)
        if err is None:
            break
        if isinstance(err, OSError) and err.errno:
            return err.errno
        err = err.__cause__ or err.__context__
    return None
