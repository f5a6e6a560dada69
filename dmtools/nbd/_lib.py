"""The one place that imports libnbd's Python bindings (module ``nbd``), lazily.

They come from Debian's ``python3-libnbd`` (there is no PyPI distribution; PyPI's ``nbd`` is an
unrelated notebook tool that would shadow it). ``scripts/setup-env`` makes the two modules visible
to the project's venv. A missing or wrong module is a clear :class:`NbdUnavailable`.
"""

from __future__ import annotations

import threading

from dmtools.nbd.errors import NbdUnavailable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["load", "is_supported", "PACKAGE"]

#: What to install when the bindings are missing.
PACKAGE = "python3-libnbd"

_lock = threading.Lock()
_module: Any = None


def load() -> Any:
    """Return libnbd's ``nbd`` module; raise ``NbdUnavailable`` naming the package if it is missing."""
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            try:
                import nbd  # type: ignore[import-not-found]
            except ImportError as err:
                raise NbdUnavailable(
                    f"libnbd's Python bindings are not importable ({err}); install the Debian package "
                    f"{PACKAGE} and run scripts/setup-env",
                    operation="nbd",
                ) from err
            version = getattr(getattr(nbd, "NBD", None), "get_version", None)
            if version is None or not hasattr(nbd, "CONTEXT_BASE_ALLOCATION"):
                raise NbdUnavailable(
                    f"the module 'nbd' at {getattr(nbd, '__file__', '?')} is not libnbd's; install "
                    f"{PACKAGE} and remove the other one",
                    operation="nbd",
                )
            _module = nbd
    return _module


def is_supported() -> bool:
    """True when libnbd's bindings can be imported."""
    try:
        load()
    except NbdUnavailable:
        return False
    return True
