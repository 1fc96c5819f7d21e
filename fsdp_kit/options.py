"""The base of every config option type: a ``StrEnum`` whose member names are the strings users type.

Hydra's structured configs check enum fields during composition, so ``sharding=fulll_shard`` fails before
anything starts, and a member still compares equal to its string (``ShardingStrategy.full_shard == "full_shard"``).
"""

from __future__ import annotations

from enum import StrEnum


class Option(StrEnum):
    """A config choice; ``str(member)`` is what the user typed."""

    @classmethod
    def names(cls) -> str:
        return ", ".join(member.value for member in cls)
