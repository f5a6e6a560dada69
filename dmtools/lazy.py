"""Package attributes loaded on first use (PEP 562), so importing a package costs only what is used.

A package lists what it re-exports as ``"module:attribute"`` (or by module, through ``package``)
and sets ``__getattr__ = lazy.exports(__name__, {...})``; the names stay importable as before
(``from kcopyd import Client``), and type checkers see them through an ``if TYPE_CHECKING:`` import.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def exports(package: str, specs: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``specs[name]`` when ``name`` is
    first asked for, and keeps it in the package's namespace afterwards."""

    def __getattr__(name: str) -> Any:
        spec = specs.get(name)
        if spec is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = spec.partition(":")
        value = getattr(importlib.import_module(module), attr)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


def package(package: str, modules: Mapping[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """``exports`` for names grouped by module (``{"mirror.log": "CoreDirtyLog open_dirty_log"}``),
    and those names sorted: the package's ``__all__``."""
    specs = {name: f"{module}:{name}" for module, names in modules.items() for name in names.split()}
    return exports(package, specs), sorted(specs)
