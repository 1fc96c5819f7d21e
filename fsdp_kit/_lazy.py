"""Package exports imported on first use.

Each component owns its config dataclass (``fsdp_kit/data/config.py``, ...), and importing it runs the package's
``__init__``. If that imported the component's code (``from fsdp_kit.data.loader import build``), composing or
checking a config would import transformers, torch.distributed.checkpoint and torch._dynamo (about 3 s) before a
bad value could be refused. So the packages export their names lazily: ``from fsdp_kit.data import build`` and
``fsdp_kit.data.build`` work as before, and import ``fsdp_kit.data.loader`` at that moment.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _LazyPackage(types.ModuleType):
    """A package whose exported names come from its submodules, each imported when the name is first used."""

    _exports: dict[str, str]

    def __getattr__(self, name: str) -> Any:  # only called for names not (yet) in the module's namespace
        where = self.__dict__.get("_exports", {}).get(name)
        if where is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{self.__name__}.{where}"), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds a submodule to its package's attribute after loading it. Where an exported
        # function has its submodule's name (fsdp_kit.models.build is the function from models/build.py), the
        # name keeps meaning the function, as it did when the package imported it eagerly.
        if isinstance(value, types.ModuleType) and self.__dict__.get("_exports", {}).get(name) == name \
                and value.__name__ == f"{self.__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.__dict__.get("_exports", {})))


def export_lazily(package: str, exports: dict[str, str]) -> None:
    """Make ``package`` (its ``__name__``) export each name in ``exports`` from the submodule named beside it, imported
    on first use."""
    module = sys.modules[package]
    module.__dict__["_exports"] = dict(exports)
    module.__class__ = _LazyPackage
