"""The classic snapshot's one-chunk copy-on-write in C (``dms.c``), built as a CPython extension
by cffi's API mode.

``dms.c`` is also part of the plain C library (:mod:`dmtools._ffi.fastio`), whose functions are
called through cffi's ABI mode: every call there builds a libffi call frame and converts its
arguments by their declared types at run time, about 7,000 instructions for the 16 arguments of
``dms_copy_commit_chunk``, as much again as the system calls' own user-space share. The
extension built here has cffi's generated wrapper for each function, which converts the
arguments with compiled code and calls the function directly (the GIL released around it as in
ABI mode).

It needs the C compiler and Python's headers; it is built on first use into the same private
cache directory as the C library (named by the hash of the source, the declarations, the
compiler and this Python's ABI), and loaded from there. Where it cannot be built, :func:`lib`
returns ``None`` (said once in the log) and :mod:`snapshot.route` uses the C library's copy of
the same functions through ABI mode.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sysconfig
import tempfile
import threading
from typing import Any

from dmtools._ffi import fastio
from dmtools._ffi.cdef import DMS_CDEF

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dms.c")
#: Set to ``0`` to use the C library's functions through ABI mode (``DMTOOLS_FAST_IO=0`` turns off both).
ENV_SWITCH = "DMTOOLS_DMS_API"
CFLAGS = ("-O2", "-Wall")

_lock = threading.Lock()
_module: Any = None  # the loaded extension; False once known to be unavailable
_reason: str | None = None


def _digest() -> str:
    import cffi

    with open(SOURCE, "rb") as f:
        source = f.read()
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or ""
    ident = "\0".join((DMS_CDEF, cc, *CFLAGS, cffi.__version__, sysconfig.get_config_var("EXT_SUFFIX") or ""))
    return hashlib.sha256(source + ident.encode()).hexdigest()[:16]


def _build(cache: str, name: str, target: str) -> None:
    """Build the extension ``name`` into ``target`` (cffi's API mode, compiled in a temporary
    directory); raises OSError with the reason."""
    import cffi

    builder = cffi.FFI()
    builder.cdef(DMS_CDEF)
    with open(SOURCE, encoding="ascii") as f:
        builder.set_source(name, f.read(), extra_compile_args=list(CFLAGS))
    with tempfile.TemporaryDirectory(prefix=".dms-", dir=cache) as tmp:
        try:  # (distutils compiles with $CC, else the compiler this Python was built with)
            built = builder.compile(tmpdir=tmp, verbose=False)
        except Exception as err:  # noqa: BLE001 - distutils raises its own error types
            raise OSError(f"building {name} failed: {err}") from err
        os.chmod(built, 0o700)
        os.replace(built, target)


def _load() -> Any:
    if fastio._compiler() is None:
        raise OSError("no C compiler (cc) on PATH")
    name = f"_dmtools_dms_{_digest()}"
    path = fastio.cached(name + importlib.machinery.EXTENSION_SUFFIXES[0],
                         lambda cache, target: _build(cache, name, target))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise OSError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        raise OSError(f"cannot load {path}: {err}") from err
    return module


def module() -> Any | None:
    """The built extension (``.ffi`` and ``.lib``: ``dms_copy_commit_chunk``, ``dms_commit_copy``,
    ``dms_last_flush_ns``, ``dms_set_fault``, ``dms_last_ops``), built on first use; ``None``
    where it cannot be (logged once), with ``DMTOOLS_DMS_API=0`` or ``DMTOOLS_FAST_IO=0``."""
    global _module, _reason
    if os.environ.get(ENV_SWITCH, "1") == "0" or os.environ.get(fastio.ENV_SWITCH, "1") == "0":
        return None
    if _module is None:
        with _lock:
            if _module is None:
                try:
                    _module = _load()
                except OSError as err:
                    _module, _reason = False, str(err)
                    log.warning("the snapshot's copy-on-write in C is called through cffi's ABI mode: its "
                                "extension could not be built (%s)", _reason)
    return _module or None


def unavailable() -> str | None:
    """Why :func:`module` returned ``None`` (after it did), else ``None``."""
    module()
    return _reason
