"""Loaded on first use, so importing a package or running a command costs only what is used.

- Package attributes (PEP 562): a package lists what it re-exports by module and sets
  ``__getattr__, __all__ = lazy.package(__name__, {...})``; the names stay importable as before
  (``from kcopyd import Client``), and type checkers see them through an ``if TYPE_CHECKING:``
  import.
- Logging: :func:`logger` stands for ``logging.getLogger(name)`` until a message is logged, and
  :func:`configure_logging` sets a command's format when ``logging`` is first imported. Importing
  ``logging`` costs a command that never logs (most runs) about a tenth of its start-up.
- ``typing``: the modules a copy loads (``dmtools copy``, ``python -m kcopyd``) import it only
  for type checkers, under ``TYPE_CHECKING = False`` / ``if TYPE_CHECKING:`` (type checkers take
  any name ``TYPE_CHECKING`` as true). Importing ``typing`` costs 12 M instructions, a sixth of
  what such a copy runs beyond ``python -c pass`` (callgrind); run-time aliases use
  ``collections.abc`` and ``X | Y``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
from collections.abc import Callable, Mapping
from types import ModuleType

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any


def package(package: str, modules: Mapping[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """A module ``__getattr__`` for ``package`` that imports a name when it is first asked for
    and keeps it in the package's namespace afterwards, and the names sorted: the package's
    ``__all__``. ``modules`` groups the names by module (``{"mirror.log": "CoreDirtyLog
    open_dirty_log"}``)."""
    where = {name: module for module, names in modules.items() for name in names.split()}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__, sorted(where)


class _Logger:
    """``logging.getLogger(name)``, looked up (and ``logging`` imported) at the first message."""

    __slots__ = ("_name", "_logger")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._logger is None:
            import logging

            self._logger = logging.getLogger(self._name)
        return getattr(self._logger, attr)


def logger(name: str) -> Any:
    """A stand-in for ``logging.getLogger(name)`` that imports ``logging`` when first used."""
    return _Logger(name)


def _basic_config(logging: ModuleType, program: str, debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format=f"{program}: %(levelname)s: %(message)s")


class _ConfigureLoggingOnImport:
    """A one-shot ``sys.meta_path`` finder: the first import of ``logging`` loads it as usual,
    then configures it (:func:`configure_logging`)."""

    def __init__(self, program: str, debug: bool) -> None:
        self.program = program
        self.debug = debug

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "logging":
            return None
        self.remove()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = spec.loader if spec is not None else None
        if loader is None:
            return spec
        load = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            load(module)
            _basic_config(module, self.program, self.debug)

        setattr(loader, "exec_module", exec_module)  # this spec's own loader object
        return spec

    def remove(self) -> None:
        """Take the hook out of ``sys.meta_path`` (the command is over, or logging is loading)."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def configure_logging(program: str, debug: bool) -> _ConfigureLoggingOnImport | None:
    """Log ``PROGRAM: LEVEL: message`` on stderr, from WARNING (everything with ``debug``).

    Unless ``logging`` is loaded already (or ``debug`` asks for it now), it is configured when
    something first imports it, by the hook this returns (the command removes it at its end)."""
    if debug or "logging" in sys.modules:
        import logging

        _basic_config(logging, program, debug)
        return None
    hook = _ConfigureLoggingOnImport(program, debug)
    sys.meta_path.insert(0, hook)
    return hook
