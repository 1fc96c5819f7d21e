"""Settings that read the environment (``${oc.env:HF_TOKEN}``) resolve where the job runs and are never written
out resolved: not into resolved_config.yaml, W&B's config, or an sbatch file.

Composing a config resolves every interpolation, and the job needs the values. So a string setting whose config
text reads the environment keeps that text beside its value (``FromEnv.raw``): whatever fsdp_kit writes uses the
text (``written``), and an sbatch file turns each ``${oc.env:NAME}`` into a shell reference to ``$NAME``, read
on the node when the job starts (``shell_text``). A setting that an ``#SBATCH`` line holds cannot read the
environment there (Slurm reads those lines before any shell runs): it is refused (``refuse_in``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from omegaconf import DictConfig, ListConfig

from fsdp_kit.errors import ConfigError

READS_ENV = re.compile(r"\$\{\s*(?:oc\.env|env)\s*:")
"""Config text that reads an environment variable (OmegaConf's oc.env resolver, or its old name env)."""
_ENV_REFERENCE = re.compile(r"\$\{\s*oc\.env\s*:\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:,\s*([^${}'\"\\`]*?)\s*)?\}")
"""``${oc.env:NAME}`` or ``${oc.env:NAME,default}`` with a default that needs no quoting in shell."""


class FromEnv(str):
    """A string setting's resolved value that came (in part) from the environment; ``raw`` is its config text."""

    raw: str

    def __new__(cls, value: str, raw: str) -> FromEnv:
        made = super().__new__(cls, value)
        made.raw = raw
        return made

    def __reduce__(self) -> tuple:  # copies (dataclasses.asdict, replace) and pickles keep the config text
        return FromEnv, (str(self), self.raw)


def _env_paths(node: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, config text) of every string leaf under ``node`` whose text reads the environment."""
    found = []
    if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
        for key in node:
            found += _env_paths(node._get_node(key), (*path, key))
    elif isinstance(node, ListConfig) and not node._is_missing() and not node._is_none():
        for index in range(len(node)):
            found += _env_paths(node._get_node(index), (*path, index))
    elif node is not None:
        raw = node._value()
        if isinstance(raw, str) and READS_ENV.search(raw):
            found.append((path, raw))
    return found


def keep_env_text(cfg: DictConfig, job: Any) -> Any:
    """``job`` (the typed, resolved ``cfg``) with each string value that ``cfg`` reads from the environment
    replaced by a ``FromEnv`` holding its config text."""
    for path, raw in _env_paths(cfg):
        holder = job
        for part in path[:-1]:
            holder = holder[part] if isinstance(holder, (dict, list)) else getattr(holder, part)
        last = path[-1]
        value = holder[last] if isinstance(holder, (dict, list)) else getattr(holder, last)
        if not isinstance(value, str):
            continue  # a number or flag from the environment: no secret, written as the value
        if isinstance(holder, (dict, list)):
            holder[last] = FromEnv(value, raw)
        else:
            setattr(holder, last, FromEnv(value, raw))
    return job


def written(value: Any) -> Any:
    """``value`` as it may be written to a file: each ``FromEnv`` inside it as its config text."""
    if isinstance(value, FromEnv):
        return value.raw
    if isinstance(value, dict):
        return {key: written(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(written(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: written(getattr(value, item.name)) for item in dataclasses.fields(value)}
    return value


def shell_text(value: str, key: str) -> str:
    """``value`` as shell text for ``eval`` on the node: each ``${oc.env:NAME}`` of a ``FromEnv`` becomes
    ``"${NAME}"`` (``"${NAME-default}"`` with a default), expanded there, quoted; other values are unchanged."""
    if not isinstance(value, FromEnv):
        return value

    def reference(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        return f'"${{{name}}}"' if default is None else f'"${{{name}-{default}}}"'

    text = _ENV_REFERENCE.sub(reference, value.raw)
    leftover = re.search(r"\$\{(?!\w+(?:-[^}]*)?\})[^}]*\}", text) or READS_ENV.search(text)
    if leftover:
        raise ConfigError(
            f"{key}: {value.raw!r} reads the environment in a way a shell line cannot repeat ({leftover.group(0)})",
            f"use plain ${{oc.env:NAME}} references in {key}, or export the variable in the job's environment",
        )
    return text


def refuse_in(value: Any, key: str, where: str) -> None:
    """A ``FromEnv`` value cannot go where no shell reads it (``where``, e.g. an #SBATCH line)."""
    if isinstance(value, FromEnv):
        raise ConfigError(
            f"{key} reads the environment ({value.raw}), and {where} cannot: it would be written there resolved",
            f"write {key}'s value itself",
        )
