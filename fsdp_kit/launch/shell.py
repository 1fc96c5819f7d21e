"""Text that goes into a shell script (an sbatch file) and can never run as shell or end a line early.

A value in a shell word is quoted; a value in a comment is escaped. Either way a control character (a newline
above all) never reaches the file as itself: a newline ends a comment, and before the ``#SBATCH`` block ends it
(Slurm stops reading directives at the first line that is not a comment), everything after it would be shell.
"""

from __future__ import annotations

import shlex

from fsdp_kit.errors import ConfigError


def shell_word(value: str) -> str:
    """``value`` as one shell word that bash reads back verbatim, always on one line.

    Printable text gets ``shlex.quote``; text with control characters gets bash's ANSI-C quoting (``$'...'``)
    with every such character as ``\\xHH`` escapes of its UTF-8 bytes, so the file stays one statement per line
    and the word is still exact for copy-and-paste."""
    if value.isprintable():
        return shlex.quote(value)
    if "\0" in value:
        # bash strings end at NUL: the word could not arrive verbatim, so refuse rather than truncate.
        raise ConfigError(f"the value {value!r} contains a NUL character", "remove it from the override or config")
    out = []
    for ch in value:
        if ch in "\\'":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            # surrogateescape: argv bytes that are not UTF-8 arrive as lone surrogates; give back the bytes.
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
    return "$'" + "".join(out) + "'"


def shell_command(argv: list[str]) -> str:
    """A command line that bash splits back into exactly ``argv``; one line, safe inside a comment too."""
    return " ".join(shell_word(arg) for arg in argv)


def comment_text(value: str) -> str:
    """``value`` for a ``#`` comment line: control characters shown as escapes, so the comment cannot end early."""
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii") for ch in value
    )


def check_plain(value: str, what: str) -> None:
    """Reject control characters in a value that is written unquoted or on one line (an ``#SBATCH`` directive)."""
    if not value.isprintable():
        raise ConfigError(
            f"{what} {value!r} contains a control character (newline, tab, ...)",
            "use plain names and values for Slurm settings",
        )
