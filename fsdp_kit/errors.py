"""User-facing errors: one line naming the problem and the fix, never a traceback (unless FSDP_KIT_DEBUG=1)."""

from __future__ import annotations

import os
import sys
import traceback
import warnings


class FsdpKitError(Exception):
    """A problem the user can fix; the CLI prints ``str(error)`` and exits non-zero."""

    exit_code = 2

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}. Fix: {fix}.")
        self.problem = problem
        self.fix = fix


class ConfigError(FsdpKitError):
    """The configuration (overrides, presets, data paths) cannot work."""


class CheckpointError(FsdpKitError):
    """A checkpoint is missing, partial, corrupt or does not match the model."""


class TrainingDivergedError(FsdpKitError):
    """Training produced non-finite losses or gradients for too many steps in a row."""

    exit_code = 3


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type), for one-line user errors."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]


def report_error(err: FsdpKitError) -> int:
    """Print ``err`` as one line on stderr (with its cause's traceback when FSDP_KIT_DEBUG=1); the exit code."""
    if os.environ.get("FSDP_KIT_DEBUG", "") not in ("", "0"):
        traceback.print_exception(err, file=sys.stderr)
    print(f"error: {err}", file=sys.stderr)
    return err.exit_code


def one_line_warnings() -> None:
    """Show warnings as ``warning: <message>`` lines, without Python's source-line echo."""

    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
