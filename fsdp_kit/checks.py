"""The range rules a component's config states beside its fields (each config's ``check(prefix)``), and their one
error format: ``trainer.batch_size=0 must be > 0. Fix: pass trainer.batch_size=<a number > 0>.``

Light on purpose (no torch, no Hydra): every config module imports it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from fsdp_kit.errors import ConfigError

# rule -> (test, what the value must be)
_TESTS: dict[str, tuple[Callable[[float], bool], str]] = {
    ">0": (lambda v: v > 0, "> 0"),
    ">=0": (lambda v: v >= 0, ">= 0"),
    ">=1": (lambda v: v >= 1, ">= 1"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "port": (lambda v: 1 <= v <= 65535, "a port number in 1-65535"),
}


def check_fields(cfg: Any, prefix: str, rules: Mapping[str, str], off_hints: Mapping[str, str] | None = None) -> None:
    """Every float of ``cfg`` finite, and each field named in ``rules`` within its rule (``>0``, ``>=0``, ``>=1``,
    ``[0,1]``, ``[0,1)``, ``port``); ``None`` (an optional setting left unset) passes. ``prefix``: where ``cfg`` sits
    in the job (``"trainer."``); ``off_hints``: what turns a field off, for fields where a user might try 0."""
    check_finite(cfg, prefix)
    for name, rule in rules.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        test, bound = _TESTS[rule]
        if not test(value):
            key = f"{prefix}{name}"
            hint = (off_hints or {}).get(name, "")
            raise ConfigError(
                f"{key}={value} must be {bound}{hint}",
                f"pass {key}=<a number {bound}>" if rule != "port" else f"pass {key}=<1-65535>",
            )


def check_finite(node: Any, prefix: str) -> None:
    """nan/inf in any float setting (lists included): comparisons with nan are always False, so a range rule
    alone lets it through."""
    if dataclasses.is_dataclass(node):
        for item in dataclasses.fields(node):
            check_finite(getattr(node, item.name), f"{prefix}{item.name}")
    elif isinstance(node, dict):
        for name, value in node.items():
            check_finite(value, f"{prefix}.{name}")
    elif isinstance(node, (list, tuple)):
        for value in node:
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(
                    f"{prefix}={list(node)} holds {value}, not a finite number", f"pass {prefix}=[<finite numbers>]"
                )
            check_finite(value, prefix)
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{prefix}={node} is not a finite number", f"pass {prefix}=<a finite number>")
