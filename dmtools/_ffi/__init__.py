"""libdevmapper bound with cffi in ABI mode: the only module that touches ``ffi`` and ``lib``.

One Python method per C function; output parameters become return values; strings are copied out
of libdm's buffers before the task that owns them is destroyed. Nothing here decides policy
(locking, errors, udev): :mod:`dmtools.kernel` does, through :class:`LibDM` and :class:`Task`.

The library is loaded lazily (:func:`open_library`) by SONAME: Debian ships
``libdevmapper.so.1.02.1``, upstream builds ``libdevmapper.so.1.02``; ``ctypes.util.find_library``
is the last resort. The C declarations are in :mod:`dmtools._ffi.cdef`, and ``ffi`` comes from
:mod:`dmtools._ffi._libdm`, generated from them by :mod:`dmtools._ffi.build` (cffi's out-of-line
ABI mode: no C declarations parsed at start-up).

Tests replace the loaded library with a fake object implementing the same C function names:
``LibDM(fake)``. Every argument passed to C goes through that object, so a fake sees exactly what
libdm would see (``bytes`` for strings, cdata for output parameters).
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from dmtools._ffi._libdm import ffi
from dmtools._ffi.cdef import DM_NAME_LIST_FLAG_HAS_UUID, SONAMES, TaskType
from dmtools.errors import KernelUnavailable

__all__ = [
    "ffi",
    "open_library",
    "LibDM",
    "Task",
    "Info",
    "NameRecord",
    "CallFailed",
    "TaskType",
    "parse_deps",
    "parse_names",
    "parse_versions",
    "decode",
    "encode",
]

_load_lock = threading.Lock()
_lib: Any = None


def encode(text: str) -> bytes:
    """A Python string as the bytes libdm gets (file-system encoding, lossless)."""
    return os.fsencode(text)


def decode(raw: bytes) -> str:
    """Bytes from libdm as a Python string (inverse of :func:`encode`)."""
    return os.fsdecode(raw)


def _library_names() -> Iterator[str]:
    """The SONAMEs, then what ``find_library`` finds (asked only when they fail: it runs
    ``ldconfig``, and ``ctypes.util`` costs start-up)."""
    yield from SONAMES
    import ctypes.util

    found = ctypes.util.find_library("devmapper")
    if found and found not in SONAMES:
        yield found


def open_library() -> Any:
    """Load libdevmapper once per process and return cffi's ``lib`` object.

    The object is kept for the life of the process (cffi dlcloses a collected library, and libdm's
    globals hold our log callback). libdm's constructor runs here and reads ``DM_DISABLE_UDEV``.

    Raises :class:`KernelUnavailable` when no libdevmapper can be loaded.
    """
    global _lib
    with _load_lock:
        if _lib is None:
            failures = []
            for name in _library_names():
                try:
                    _lib = ffi.dlopen(name)
                    break
                except OSError as err:
                    failures.append(f"{name}: {err}")
            else:
                raise KernelUnavailable(
                    "libdevmapper cannot be loaded (install the libdevmapper1.02.1 package); tried "
                    + "; ".join(failures),
                    operation="open",
                )
        return _lib


class CallFailed(Exception):
    """A libdm function returned failure (0) before any ioctl; libdm logged why."""

    def __init__(self, function: str) -> None:
        super().__init__(f"{function} failed")
        self.function = function


class Info(NamedTuple):
    """``struct dm_info`` (the 12-field layout of ``DM_1_02_97``)."""

    exists: bool
    suspended: bool
    live_table: bool
    inactive_table: bool
    open_count: int
    event_nr: int
    major: int
    minor: int
    read_only: bool
    target_count: int
    deferred_remove: bool
    internal_suspend: bool


@dataclass(frozen=True)
class NameRecord:
    """One record of a LIST result (``struct dm_name_list`` of dm-ioctl.h)."""

    name: str
    dev: int
    event_nr: int | None = None
    uuid: str | None = None

    @property
    def major(self) -> int:
        """Major number (the kernel's huge encoding, libdm/misc/kdev_t.h)."""
        return (self.dev & 0xFFF00) >> 8

    @property
    def minor(self) -> int:
        """Minor number (the kernel's huge encoding, libdm/misc/kdev_t.h)."""
        return (self.dev & 0xFF) | ((self.dev >> 12) & 0xFFF00)


def _align8(address: int) -> int:
    # align_ptr() of drivers/md/dm-ioctl.c: 8-byte alignment of the absolute address.
    return (address + 7) & ~7


def parse_deps(deps: Any) -> list[int]:
    """The device numbers of a ``struct dm_deps *`` (kernel huge encoding)."""
    if deps == ffi.NULL:
        return []
    return [int(deps.device[i]) for i in range(deps.count)]


def parse_names(names: Any, *, has_event_nr: bool) -> list[NameRecord]:
    """Walk the records of a ``struct dm_names *`` by their ``next`` offsets.

    An empty list is a first record with ``dev == 0``. After each NUL-terminated name, at the next
    8-byte boundary, dm-ioctl >= 4.37 stores ``uint32 event_nr`` and ``uint32 flags``; with
    ``DM_NAME_LIST_FLAG_HAS_UUID`` in flags the uuid string follows at the next boundary
    (drivers/md/dm-ioctl.c ``list_devices``). ``has_event_nr`` says the driver is that new.
    """
    records: list[NameRecord] = []
    if names == ffi.NULL or names.dev == 0:
        return records
    base = ffi.cast("char *", names)
    offset = 0
    while True:
        rec = ffi.cast("struct dm_names *", base + offset)
        raw_name = ffi.string(rec.name)
        event_nr = uuid = None
        if has_event_nr:
            name_addr = int(ffi.cast("uintptr_t", rec.name))
            extra_addr = _align8(name_addr + len(raw_name) + 1)
            extra = ffi.cast("uint32_t *", extra_addr)
            event_nr = int(extra[0])
            flags = int(extra[1])
            if flags & DM_NAME_LIST_FLAG_HAS_UUID:
                uuid = decode(ffi.string(ffi.cast("char *", _align8(extra_addr + 8))))
        records.append(NameRecord(decode(raw_name), int(rec.dev), event_nr, uuid))
        if rec.next == 0:
            return records
        offset += int(rec.next)


def parse_versions(versions: Any) -> list[tuple[str, tuple[int, int, int]]]:
    """Walk a ``struct dm_versions *`` (LIST_VERSIONS result): ``(target name, version)``."""
    out: list[tuple[str, tuple[int, int, int]]] = []
    if versions == ffi.NULL:
        return out
    base = ffi.cast("char *", versions)
    offset = 0
    while True:
        rec = ffi.cast("struct dm_versions *", base + offset)
        out.append(
            (
                decode(ffi.string(rec.name)),
                (int(rec.version[0]), int(rec.version[1]), int(rec.version[2])),
            )
        )
        if rec.next == 0:
            return out
        offset += int(rec.next)


def _string(ptr: Any) -> str | None:
    return None if ptr == ffi.NULL else decode(ffi.string(ptr))


class Task:
    """A ``struct dm_task`` and the calls made on it. Use as a context manager (destroys it)."""

    def __init__(self, lib: Any, ptr: Any, task_type: TaskType) -> None:
        self._lib = lib
        self._ptr = ptr
        self.type = task_type

    # -- lifetime ----------------------------------------------------------------------------------

    def destroy(self) -> None:
        """``dm_task_destroy``; safe to call twice (never passes NULL, which libdm dereferences)."""
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            self._lib.dm_task_destroy(ptr)

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    @property
    def ptr(self) -> Any:
        """The live ``struct dm_task *``."""
        if self._ptr is None:
            raise ValueError("device-mapper task already destroyed")
        return self._ptr

    def _call(self, function: str, *args: Any) -> None:
        if not getattr(self._lib, function)(self.ptr, *args):
            raise CallFailed(function)

    # -- what to do ----------------------------------------------------------------------------

    def set_name(self, name: str) -> None:
        """``dm_task_set_name``."""
        self._call("dm_task_set_name", encode(name))

    def set_uuid(self, uuid: str) -> None:
        """``dm_task_set_uuid``."""
        self._call("dm_task_set_uuid", encode(uuid))

    def set_major_minor(self, major: int, minor: int) -> None:
        """``dm_task_set_major_minor`` (no fallback to the default major)."""
        self._call("dm_task_set_major_minor", major, minor, 0)

    def set_newname(self, name: str) -> None:
        """``dm_task_set_newname`` (RENAME)."""
        self._call("dm_task_set_newname", encode(name))

    def set_ro(self) -> None:
        """``dm_task_set_ro``: the table is loaded read-only."""
        self._call("dm_task_set_ro")

    def no_flush(self) -> None:
        """``dm_task_no_flush``."""
        self._call("dm_task_no_flush")

    def deferred_remove(self) -> None:
        """``dm_task_deferred_remove``."""
        self._call("dm_task_deferred_remove")

    def query_inactive_table(self) -> None:
        """``dm_task_query_inactive_table`` (TABLE/STATUS of the inactive slot)."""
        self._call("dm_task_query_inactive_table")

    def ima_measurement(self) -> None:
        """``dm_task_ima_measurement``: a STATUS task returns STATUSTYPE_IMA text (libdm 1.02.181+;
        check ``LibDM.supports`` first, an older libdm lacks the symbol)."""
        self._call("dm_task_ima_measurement")

    def set_message(self, message: str) -> None:
        """``dm_task_set_message``."""
        self._call("dm_task_set_message", encode(message))

    def set_sector(self, sector: int) -> None:
        """``dm_task_set_sector``."""
        self._call("dm_task_set_sector", sector)

    def add_target(self, start: int, length: int, target_type: str, params: str) -> None:
        """``dm_task_add_target`` (start and length in 512-byte sectors)."""
        self._call("dm_task_add_target", start, length, encode(target_type), encode(params))

    def set_cookie(self, flags: int) -> int:
        """``dm_task_set_cookie`` with a fresh cookie; returns it (0 when udev sync is off)."""
        cookie = ffi.new("uint32_t *", 0)
        self._call("dm_task_set_cookie", cookie, flags)
        return int(cookie[0])

    # -- running -----------------------------------------------------------------------------------

    def run(self) -> bool:
        """``dm_task_run``: True on success."""
        return bool(self._lib.dm_task_run(self.ptr))

    def errno(self) -> int:
        """``dm_task_get_errno``: the errno of the last ioctl (0 when none failed)."""
        return int(self._lib.dm_task_get_errno(self.ptr))

    # -- results (only after a successful run: libdm frees the buffer on failure) -------------

    def info(self) -> Info | None:
        """``dm_task_get_info``; None when the task holds no ioctl result."""
        dmi = ffi.new("struct dm_info *")
        if not self._lib.dm_task_get_info(self.ptr, dmi):
            return None
        return Info(bool(dmi.exists), bool(dmi.suspended), bool(dmi.live_table), bool(dmi.inactive_table),
                    int(dmi.open_count), int(dmi.event_nr), int(dmi.major), int(dmi.minor), bool(dmi.read_only),
                    int(dmi.target_count), bool(dmi.deferred_remove), bool(dmi.internal_suspend))

    def name(self) -> str | None:
        """``dm_task_get_name`` (copied)."""
        return _string(self._lib.dm_task_get_name(self.ptr))

    def uuid(self) -> str | None:
        """``dm_task_get_uuid`` (copied)."""
        return _string(self._lib.dm_task_get_uuid(self.ptr))

    def targets(self) -> list[tuple[int, int, str, str]]:
        """Every ``(start, length, type, params)`` of a TABLE/STATUS/WAITEVENT result."""
        start = ffi.new("uint64_t *")
        length = ffi.new("uint64_t *")
        ttype = ffi.new("char **")
        params = ffi.new("char **")
        out: list[tuple[int, int, str, str]] = []
        nxt = ffi.NULL
        while True:
            nxt = self._lib.dm_get_next_target(self.ptr, nxt, start, length, ttype, params)
            if ttype[0] != ffi.NULL:
                out.append((int(start[0]), int(length[0]), _string(ttype[0]) or "", _string(params[0]) or ""))
            if nxt == ffi.NULL:
                return out

    def deps(self) -> list[int]:
        """``dm_task_get_deps``: device numbers (kernel huge encoding)."""
        return parse_deps(self._lib.dm_task_get_deps(self.ptr))

    def names(self, *, has_event_nr: bool) -> list[NameRecord]:
        """``dm_task_get_names`` of a LIST result."""
        return parse_names(self._lib.dm_task_get_names(self.ptr), has_event_nr=has_event_nr)

    def versions(self) -> list[tuple[str, tuple[int, int, int]]]:
        """``dm_task_get_versions`` of a LIST_VERSIONS result."""
        return parse_versions(self._lib.dm_task_get_versions(self.ptr))

    def message_response(self) -> str | None:
        """``dm_task_get_message_response``: the target's answer, None when it gave none."""
        return _string(self._lib.dm_task_get_message_response(self.ptr))

    def driver_version(self) -> str:
        """``dm_task_get_driver_version``: ``"4.x.y"`` from this task's ioctl."""
        buf = ffi.new("char[]", 64)
        if not self._lib.dm_task_get_driver_version(self.ptr, buf, 64):
            return ""
        return decode(ffi.string(buf))


#: Receives ``(level, text)`` for every message libdm logs (level: low 3 bits, 2 fatal .. 7 debug).
LogSink = Callable[[int, str], None]

_sink: LogSink | None = None
_callback: Any = None  # the ffi.callback object; must stay alive while libdm holds it


def _on_log(level: int, file: Any, line: int, fmt: Any, text: Any) -> None:
    sink = _sink
    if sink is None:
        return
    raw_fmt = ffi.string(fmt) if fmt != ffi.NULL else b""
    # Only the "%s" form carries the formatted text as the fifth argument (_log_to_default_log).
    if raw_fmt == b"%s" and text != ffi.NULL:
        message = ffi.string(text)
    else:
        message = raw_fmt
    sink(int(level), message.decode("utf-8", "replace"))


def _ignore_error(exc_type: Any, exc: Any, tb: Any) -> None:
    # An exception must not cross into C; a sink that fails only loses one log line.
    return None


def _new_log_callback() -> Any:
    """The C function pointer libdm's logger calls (``ffi.callback``; tests make it fail)."""
    return ffi.callback("dmtools_log_fn", _on_log, onerror=_ignore_error)


class LibDM:
    """The library calls that are not made on one task."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.log_hook_error: str | None = None
        self.log_hooked = False

    def install_log_hook(self, sink: LogSink) -> bool:
        """Route libdm's log through ``sink`` instead of stderr (``dm_log_init``).

        Returns False, with the reason in ``log_hook_error``, when cffi cannot create a callback
        (no write+execute memory: SELinux ``deny_execmem``, ``MemoryDenyWriteExecute``); libdm
        then keeps printing to stderr.
        """
        global _callback, _sink
        _sink = sink
        if _callback is None:
            try:
                _callback = _new_log_callback()
            except Exception as err:  # noqa: BLE001 - cffi raises MemoryError/RuntimeError here
                self.log_hook_error = f"cannot create a cffi callback: {err}"
                return False
        self.lib.dm_log_init(_callback)
        if not self.log_hooked:
            # libdm logs from its destructor (dm_lib_exit, e.g. "exiting with N device(s) still
            # suspended"), after Python is finalized: restore its own printer before that.
            atexit.register(self.uninstall_log_hook)
        self.log_hooked = True
        return True

    def uninstall_log_hook(self) -> None:
        """Give libdm its default (stderr) logger back: ``dm_log_init(NULL)``."""
        if self.log_hooked:
            self.lib.dm_log_init(ffi.NULL)
            self.log_hooked = False

    def supports(self, function: str) -> bool:
        """True when the loaded libdm exports ``function`` (cffi resolves symbols on first use)."""
        try:
            getattr(self.lib, function)
        except AttributeError:
            return False
        return True

    def task(self, task_type: TaskType) -> Task | None:
        """``dm_task_create``; None when libdm refuses (driver unusable or out of memory)."""
        ptr = self.lib.dm_task_create(int(task_type))
        if ptr == ffi.NULL:
            return None
        return Task(self.lib, ptr, task_type)

    def library_version(self) -> str:
        """``dm_get_library_version``."""
        buf = ffi.new("char[]", 128)
        self.lib.dm_get_library_version(buf, 128)
        return decode(ffi.string(buf))

    def driver_version(self) -> str:
        """``dm_driver_version`` ("" when the driver is unusable; the buffer starts zeroed)."""
        buf = ffi.new("char[]", 128)
        if not self.lib.dm_driver_version(buf, 128):
            return ""
        return decode(ffi.string(buf))

    def udev_set_sync_support(self, enabled: bool) -> None:
        """``dm_udev_set_sync_support`` (process-wide in libdm)."""
        self.lib.dm_udev_set_sync_support(1 if enabled else 0)

    def udev_get_sync_support(self) -> bool:
        """``dm_udev_get_sync_support``: true only when udevd runs and semaphores work."""
        return bool(self.lib.dm_udev_get_sync_support())

    def udev_wait(self, cookie: int) -> bool:
        """``dm_udev_wait``: blocks until udev completed ``cookie``; flushes node operations."""
        return bool(self.lib.dm_udev_wait(cookie))

    def udev_wait_immediate(self, cookie: int) -> tuple[bool, bool]:
        """``dm_udev_wait_immediate``: ``(ok, ready)`` without blocking (cookie must be non-zero)."""
        ready = ffi.new("int *", 0)
        ok = bool(self.lib.dm_udev_wait_immediate(cookie, ready))
        return ok, bool(ready[0])

    def udev_complete(self, cookie: int) -> bool:
        """``dm_udev_complete``: decrement the cookie's semaphore as udev's rule would."""
        return bool(self.lib.dm_udev_complete(cookie))

    def update_nodes(self) -> None:
        """``dm_task_update_nodes``: perform stacked ``/dev/mapper`` node operations now."""
        self.lib.dm_task_update_nodes()

    def release(self) -> None:
        """``dm_lib_release``: close the control fd and flush node operations."""
        self.lib.dm_lib_release()
