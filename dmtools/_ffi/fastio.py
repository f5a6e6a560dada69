"""The exposure's C data path (``fastio.c``): built on first use with the system's C compiler, loaded
with ctypes.

The library is plain C (no Python headers, no libfuse headers): ``cc -shared`` turns ``fastio.c``
into ``fastio-<hash>.so`` in a cache directory of this user (``$DMTOOLS_CACHE_DIR``, else
``$XDG_CACHE_HOME/dmtools``, else ``~/.cache/dmtools``), named by the hash of the source and the
flags, so an edited source is rebuilt and nothing stale is loaded. The directory and the library
must belong to this user and be writable by no one else: root loads code from there. Without a
compiler (or with ``DMTOOLS_FAST_IO=0``) :func:`load` returns ``None`` and says why once in the log;
the exposure then serves every request in Python.

This module only declares the C surface and builds it; :mod:`dmtools.engine.fastpath` decides
what to install. kcopyd's lean path calls its own two functions through cffi instead
(:func:`kcopyd_lib`: a cffi call costs about two thirds of a ctypes one, paid per job).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastio.c")
#: Files ``fastio.c`` includes (``#include "dms.c"``): their text is part of the library's hash.
INCLUDED = (os.path.join(os.path.dirname(SOURCE), "dms.c"),)
CFLAGS = ("-O2", "-std=gnu11", "-fPIC", "-shared", "-pthread", "-Wall", "-Werror")
#: ``DMF_ABI`` in fastio.c: a library answering another number is not used.
ABI = 3
#: Counters of a slot (``enum`` ``ST_*`` in fastio.c), in order.
#: ``first_writes``: writes of a snapshot origin made with their copies in C (counted in ``writes`` too).
STATS = ("reads", "writes", "read_bytes", "write_bytes", "fallbacks", "errors", "first_writes")
#: Words of a map description (``HDR_WORDS``, ``SEG_WORDS``, ``LEG_WORDS`` in fastio.c).
HDR_WORDS, SEG_WORDS, LEG_WORDS = 5, 4, 5
#: Set to ``0`` to serve every FUSE request in Python.
ENV_SWITCH = "DMTOOLS_FAST_IO"

_c_u64 = ctypes.c_uint64
_c_vp = ctypes.c_void_p
#: name -> (restype, argtypes) of every function fastio.c exports.
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "dmf_abi": (ctypes.c_int, []),
    "dmf_setup": (None, [_c_vp, ctypes.c_size_t, ctypes.c_size_t]),
    "dmf_ctx_new": (_c_vp, [_c_vp, _c_vp, _c_vp, ctypes.c_size_t, ctypes.c_size_t]),
    "dmf_ctx_free": (None, [_c_vp]),
    "dmf_slot_new": (_c_u64, [_c_vp]),
    "dmf_slot_set": (ctypes.c_int, [_c_vp, _c_u64, ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t,
                                     ctypes.c_long]),
    "dmf_slot_free": (ctypes.c_int, [_c_vp, _c_u64, ctypes.c_long]),
    "dmf_slot_stats": (ctypes.c_int, [_c_vp, _c_u64, ctypes.POINTER(_c_u64)]),
    "dmf_slot_write": (ctypes.c_int, [_c_vp, _c_u64, _c_vp, ctypes.c_size_t, ctypes.c_int64]),
    "dmf_slot_read": (ctypes.c_int, [_c_vp, _c_u64, _c_vp, ctypes.c_size_t, ctypes.c_int64]),
    "dmf_loop_setup": (None, [ctypes.POINTER(_c_vp), ctypes.c_size_t]),
    "dmf_py_setup": (None, [ctypes.POINTER(_c_vp), ctypes.c_size_t]),
    "dmf_chunks_new": (_c_vp, [_c_u64]),
    "dmf_chunks_put": (None, [_c_vp]),
    "dmf_chunks_mark": (None, [_c_vp, _c_u64, _c_u64]),
    "dmf_chunks_clear": (None, [_c_vp]),
    "dmf_chunks_count": (_c_u64, [_c_vp]),
    "dmf_slot_set_origin": (ctypes.c_int, [_c_vp, _c_u64, _c_u64, ctypes.c_int, _c_vp, _c_u64, ctypes.c_long]),
    "dmf_chunks_first": (ctypes.c_int, [_c_vp, ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t]),
    "dmf_first_fault": (None, [ctypes.c_int, ctypes.c_int]),
    "dmf_first_trace": (None, [ctypes.c_int]),
    "dmf_first_ops": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int]),
    "dmf_main": (ctypes.c_int, [ctypes.c_int, _c_vp, _c_vp, ctypes.c_size_t, _c_vp]),
}
#: libfuse 3 functions that ``dmf_main`` calls (``g_fuse`` in fastio.c), in that order. The
#: versioned names are the 3.12/3.1 ABIs that ``fuse_main_real`` of libfuse 3.14 uses.
LOOP_FUNCTIONS = ("fuse_parse_cmdline_312", "fuse_new_31", "fuse_mount", "fuse_daemonize", "fuse_get_session",
                  "fuse_set_signal_handlers", "fuse_remove_signal_handlers", "fuse_unmount", "fuse_destroy",
                  "fuse_opt_free_args", "fuse_session_receive_buf", "fuse_session_process_buf", "fuse_session_exited",
                  "fuse_session_exit", "fuse_session_fd")
#: CPython's functions ``dmf_main``'s workers keep a thread state with (``g_py`` in fastio.c), in
#: that order (``Py_IsFinalizing`` is ``_Py_IsFinalizing`` before Python 3.13).
PY_FUNCTIONS = ("PyGILState_Ensure", "PyGILState_Release", "PyEval_SaveThread", "PyEval_RestoreThread",
                "Py_IsFinalizing")
#: The ``fuse_operations`` entries fastio.c provides, by field name.
OPERATIONS = {"init": "dmf_op_init", "write": "dmf_op_write", "read_buf": "dmf_op_read_buf"}

_lock = threading.Lock()
_loaded: "FastIO | None" = None
_reason: str | None = None


def _cache_dirs() -> list[str]:
    env = os.environ.get("DMTOOLS_CACHE_DIR")
    if env:
        return [env]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(xdg, "dmtools"), os.path.join(tempfile.gettempdir(), f"dmtools-cache-{os.geteuid()}")]


def _private(path: str, *, directory: bool) -> bool:
    """True when ``path`` is ours and writable by no one else (not a symlink)."""
    st = os.lstat(path)
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    return kind and st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else (shutil.which("cc") or shutil.which("gcc"))


def _build(cc: str) -> str:
    """The path of the built library (built now unless cached); raises OSError with the reason."""
    source = b""
    for path in (SOURCE, *INCLUDED):
        with open(path, "rb") as f:
            source += f.read()
    digest = hashlib.sha256(source + "\0".join((cc, *CFLAGS)).encode()).hexdigest()[:16]

    def compile_into(cache: str, lib: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".fastio-", suffix=".so", dir=cache)
        os.close(fd)
        try:
            done = subprocess.run([cc, *CFLAGS, "-o", tmp, SOURCE], capture_output=True,
                                  text=True, timeout=120, check=False)
            if done.returncode != 0:
                raise OSError(f"{cc} failed: {done.stderr.strip()[:2000]}")
            os.chmod(tmp, 0o700)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    return cached(f"fastio-{digest}.so", compile_into)


def cached(name: str, build: Callable[[str, str], None]) -> str:
    """The path of ``name`` in the first usable private cache directory, made there by
    ``build(cache, path)`` unless it is already there; raises OSError with every directory's reason.
    A directory or file not private to this user is never used."""
    errors = []
    for cache in _cache_dirs():
        try:
            os.makedirs(cache, mode=0o700, exist_ok=True)
            if not _private(cache, directory=True):
                raise OSError(f"{cache} is not private to uid {os.geteuid()}")
            path = os.path.join(cache, name)
            if not os.path.exists(path):
                build(cache, path)
            if not _private(path, directory=False):
                raise OSError(f"{path} is not private to uid {os.geteuid()}")
            return path
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(str(err))
    raise OSError("; ".join(errors))


def _millis(timeout: float | None) -> int:
    return -1 if timeout is None else max(0, int(timeout * 1000))


class FastIO:
    """The loaded library: one Python method per exported C function (``fastio.c``)."""

    def __init__(self, lib: ctypes.CDLL, path: str = "") -> None:
        self.lib = lib
        #: the built library's file (:func:`kcopyd_lib` opens it again through cffi).
        self.path = path
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes

    def operation(self, field: str) -> int:
        """The address of the C function for ``fuse_operations.<field>`` (:data:`OPERATIONS`)."""
        return ctypes.cast(getattr(self.lib, OPERATIONS[field]), _c_vp).value or 0

    def setup(self, get_context: int, private_off: int, fh_off: int) -> None:
        """libfuse's ``fuse_get_context`` and the offsets of ``fuse_context.private_data`` and
        ``fuse_file_info.fh`` (the same in every FUSE session of a process)."""
        self.lib.dmf_setup(get_context, private_off, fh_off)

    def loop_setup(self, libfuse: Any) -> bool:
        """Hand ``dmf_main`` libfuse's functions (:data:`LOOP_FUNCTIONS`) from the loaded
        ``libfuse`` (a ``ctypes.CDLL``); False when one is missing (another libfuse than 3.12+)."""
        try:
            fns = [ctypes.cast(getattr(libfuse, name), _c_vp).value for name in LOOP_FUNCTIONS]
        except AttributeError:
            return False
        self.lib.dmf_loop_setup((_c_vp * len(fns))(*fns), len(fns))
        return True

    def py_setup(self) -> None:
        """Hand ``dmf_main``'s workers this interpreter's thread-state functions
        (:data:`PY_FUNCTIONS`): each keeps one Python thread state for its life (nothing where
        one is missing)."""
        api = ctypes.pythonapi
        found: list[Any] = [getattr(api, name, None) or getattr(api, "_" + name, None) for name in PY_FUNCTIONS]
        if not all(found):  # (another Python: each callback makes its own thread state, as before)
            return
        fns = [ctypes.cast(fn, _c_vp).value for fn in found]
        self.lib.dmf_py_setup((_c_vp * len(fns))(*fns), len(fns))

    def main(self, argc: int, argv: Any, ops: Any, ops_size: int, ctx: int) -> int:
        """``fuse_main_real`` with the receive loop of fastio.c (``dmf_main``): requests of
        mapped devices are served as they arrive, with page-aligned write data. Returns
        ``fuse_main_real``'s exit code."""
        return int(self.lib.dmf_main(argc, ctypes.cast(argv, _c_vp), ctypes.cast(ops, _c_vp), ops_size, ctx))

    def ctx_new(self, py_write: int, py_read_buf: int, py_init: int, pipe_min: int, pipe_bytes: int) -> int:
        """A context for one FUSE session, given the Python callbacks it falls back to."""
        ctx = self.lib.dmf_ctx_new(py_write, py_read_buf, py_init, pipe_min, pipe_bytes)
        if not ctx:
            raise MemoryError("no memory for the FUSE fast path")
        return int(ctx)

    def ctx_free(self, ctx: int) -> None:
        """Free a context whose FUSE session has ended (every slot's map with it)."""
        self.lib.dmf_ctx_free(ctx)

    def slot_new(self, ctx: int) -> int:
        """A new slot's id (the FUSE file handle of its file), 0 when every slot is taken."""
        return int(self.lib.dmf_slot_new(ctx))

    def slot_set(self, ctx: int, slot: int, words: list[int] | None, timeout: float | None = None) -> None:
        """Install a map (:data:`HDR_WORDS`...) or none, once the requests in flight are done
        (waiting at most ``timeout`` seconds); raises ``OSError`` for a map that cannot be
        installed, or ``ETIMEDOUT``: the slot's map is then not used by new requests."""
        n = len(words or ())
        arr = (ctypes.c_int64 * max(n, 1))(*(words or ()))
        ret = self.lib.dmf_slot_set(ctx, slot, arr, n, _millis(timeout))
        if ret:
            raise OSError(-ret, f"fast path map: {os.strerror(-ret)}")

    def slot_free(self, ctx: int, slot: int, timeout: float | None = None) -> None:
        """Drop a slot (its map first) once its requests in flight are done, waiting at most
        ``timeout`` seconds; raises ``OSError`` (``ETIMEDOUT``: it stays taken, unused)."""
        ret = self.lib.dmf_slot_free(ctx, slot, _millis(timeout))
        if ret:
            raise OSError(-ret, f"fast path slot: {os.strerror(-ret)}")

    def slot_stats(self, ctx: int, slot: int) -> dict[str, int]:
        """The slot's counters (:data:`STATS`); empty for a slot that is gone."""
        out = (_c_u64 * len(STATS))()
        if self.lib.dmf_slot_stats(ctx, slot, out):
            return {}
        return dict(zip(STATS, out))

    def chunks_new(self, size: int) -> int:
        """An empty chunk set of a snapshot origin of ``size`` bytes (``dmf_chunks_new``)."""
        chunks = self.lib.dmf_chunks_new(size)
        if not chunks:
            raise MemoryError("no memory for a snapshot origin's chunk set")
        return int(chunks)

    def chunks_put(self, chunks: int) -> None:
        """Drop the caller's reference to a chunk set (the maps using it keep theirs)."""
        self.lib.dmf_chunks_put(chunks)

    def chunks_mark(self, chunks: int, offset: int, length: int) -> None:
        """Add the granules lying wholly in ``[offset, offset+length)`` to the set."""
        self.lib.dmf_chunks_mark(chunks, offset, length)

    def chunks_clear(self, chunks: int) -> None:
        """Empty the set once the C writes relying on it are done."""
        self.lib.dmf_chunks_clear(chunks)

    def chunks_count(self, chunks: int) -> int:
        """How many granules the set holds."""
        return int(self.lib.dmf_chunks_count(chunks))

    def chunks_first(self, chunks: int, snaps: list[tuple[int, int, int]]) -> None:
        """Install in a chunk set the first writes its misses are made with in C: per snapshot of
        the origin, in copy order, ``(C state address, COW device's slot, chunk bytes)``; none for
        an empty list (``dmf_chunks_first``: each state referenced until replaced or withdrawn).
        Waits for the C writes relying on the set; raises ``OSError`` for a bad description."""
        words = [w for snap in snaps for w in snap]
        arr = (ctypes.c_int64 * max(len(words), 1))(*words)
        ret = self.lib.dmf_chunks_first(chunks, arr, len(words))
        if ret:
            raise OSError(-ret, f"first writes in C: {os.strerror(-ret)}")

    def first_fault(self, step: int, short: bool = False) -> None:
        """Tests: the next first write made in C fails at dms.c's system call ``step`` (0 origin
        read, 1 COW write, 2 PREFLUSH, 3 area write, 4 FUA, 5 origin write), or moves half its
        bytes with ``short``."""
        self.lib.dmf_first_fault(step, int(short))

    def first_trace(self, on: bool) -> None:
        """Tests: keep (``on``) the system calls of the first writes made in C from now on."""
        self.lib.dmf_first_trace(int(on))

    def first_ops(self) -> str:
        """Tests: those system calls, one letter each (``r``, ``w``, ``f``), each snapshot's
        copy and commit followed by ``.``."""
        out = ctypes.create_string_buffer(4096)
        n = self.lib.dmf_first_ops(out, len(out))
        return out.raw[:n].decode()

    def slot_set_origin(self, ctx: int, slot: int, size: int, readonly: bool, chunks: int, lower: int,
                        timeout: float | None = None) -> None:
        """Install a snapshot-origin map: requests pass onto slot ``lower``'s map, writes only
        where ``chunks`` holds them (``dmf_slot_set_origin``); raises as :meth:`slot_set`."""
        ret = self.lib.dmf_slot_set_origin(ctx, slot, size, int(readonly), chunks, lower, _millis(timeout))
        if ret:
            raise OSError(-ret, f"fast path map: {os.strerror(-ret)}")

    def slot_write(self, ctx: int, slot: int, buf: Any, offset: int) -> int | None:
        """Write ``buf`` through the slot's map as a FUSE write would: its length, or ``None``
        where the request would go to Python."""
        view = memoryview(buf).cast("B")
        c_buf = (ctypes.c_char * len(view)).from_buffer_copy(view) if view.readonly else \
            (ctypes.c_char * len(view)).from_buffer(view)
        n = self.lib.dmf_slot_write(ctx, slot, c_buf, len(view), offset)
        return None if n < 0 else int(n)

    def slot_read(self, ctx: int, slot: int, buf: Any, offset: int) -> int | None:
        """Read into ``buf`` through the slot's map: its length, or ``None`` (the Python path)."""
        view = memoryview(buf).cast("B")
        n = self.lib.dmf_slot_read(ctx, slot, (ctypes.c_char * len(view)).from_buffer(view), len(view), offset)
        return None if n < 0 else int(n)


def load() -> FastIO | None:
    """The library, built on first use; ``None`` (logged once, with the reason) where it cannot
    be built or loaded, or when ``DMTOOLS_FAST_IO=0``."""
    global _loaded, _reason
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    with _lock:
        if _loaded is None and _reason is None:
            cc = _compiler()
            try:
                if cc is None:
                    raise OSError("no C compiler (cc) on PATH")
                path = _build(cc)
                lib = FastIO(ctypes.CDLL(path), path)
                if lib.lib.dmf_abi() != ABI:
                    raise OSError("fastio library of another ABI")
                _loaded = lib
            except (OSError, AttributeError) as err:
                _reason = str(err)
                log.warning("exposed devices' I/O runs in Python: the C fast path is unavailable "
                            "(%s)", _reason)
        return _loaded


_kcopyd_lock = threading.Lock()
_kcopyd: Any = None  # the cffi library, False once known to be unavailable


def kcopyd_lib() -> Any | None:
    """The library's kcopyd functions (``dmk_copy``, ``dmk_copy1``, ``dmk_set_max_io``: declared in
    :mod:`dmtools._ffi.cdef`) opened through cffi, or ``None`` where :func:`load` gives no library
    (kcopyd's lean path then copies in Python)."""
    global _kcopyd
    if _kcopyd is None:
        with _kcopyd_lock:
            if _kcopyd is None:
                fast = load()
                if fast is None:
                    _kcopyd = False
                else:
                    from dmtools._ffi._libdm import ffi

                    _kcopyd = ffi.dlopen(fast.path)
    return _kcopyd or None


def unavailable() -> str | None:
    """Why :func:`load` returned ``None`` (after it did), else ``None``."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    load()
    return _reason
