"""The kernel backend: real device-mapper driven through libdevmapper (``dmtools.open("kernel")``).

Every libdevmapper call goes through :meth:`KernelBackend._run`, which owns

* **serialisation**: one process-wide lock (:data:`LIBDM_LOCK`) around every libdm call, because
  libdm keeps global state (control fd, stacked node operations, the version check) and promises
  no thread safety;
* **error capture**: libdm's log is routed through a cffi callback into a per-call list that
  becomes the exception text (nothing is printed on stderr); kernel log lines (``/dev/kmsg``) that
  appear during a table load or message carry the kernel's own reason into the error;
* **udev**: a cookie for the ioctls that emit uevents (resume, remove, rename), waited for with a
  bound; without udevd (nothing answering on ``/run/udev/control``) sync is switched off and libdm's own node
  creation runs at once (``dm_task_update_nodes``), so ``/dev/mapper/NAME`` still appears;
* **errors**: the ioctl errno is mapped per operation to :mod:`dmtools.errors` classes;
* **debug logging** on the ``dmtools.kernel`` logger (libdm's own lines on ``dmtools.kernel.libdm``).

Create with a table is run as create → load → resume here, removing the new device when a later
step fails. libdm would do the same for a CREATE task with targets (libdm-iface.c
``_create_and_load_v4``) but then reports the errno of its revert, not of the failed load, so the
kernel's reason would be lost.

Before libdm is loaded, ``/dev/mapper/control`` is checked (stat + open): where device-mapper is
missing :class:`KernelUnavailable` names it, and libdm is never asked (it would remember the failure
for the life of the process and may mknod the node itself when run as root).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import select
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from dmtools import _ffi
from dmtools._ffi import CallFailed, Info, LibDM, Task, TaskType
from dmtools._ffi.cdef import DM_UDEV_DISABLE_DM_RULES_FLAG, DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG
from dmtools.backend import DeviceEntry, DeviceInfo, DeviceMapper, StatusLine, Versions, wait_closed
from dmtools.errors import (DeviceBusy, DeviceExists, DeviceNotFound, DMError, InvalidArgument, InvalidTable,
                            KernelUnavailable, TargetNotSupported, from_errno)
from dmtools.linux import CONTROL_PATH, DM_DEV_ARM_POLL, block_attr, udev_running
from dmtools.names import DM_NAME_LEN, DM_UUID_LEN, mangle, validate_name, validate_uuid

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.endpoint import Endpoint
    from dmtools.table import Table

__all__ = ["KernelBackend", "check_control", "LIBDM_LOCK"]

log = logging.getLogger(__name__)
_libdm_log = logging.getLogger(__name__ + ".libdm")

T = TypeVar("T")

#: The kernel log, read for device-mapper's own reason when a table load or message fails.
KMSG_PATH = "/dev/kmsg"
MAPPER_DIR = "/dev/mapper"

#: EBUSY retries of remove: libdm's DM_IOCTL_RETRIES and DM_RETRY_USLEEP_DELAY (libdm-iface.c).
REMOVE_RETRIES = 25
REMOVE_RETRY_DELAY = 0.2

#: dm-ioctl minor version that brought DM_IMA_MEASUREMENT_FLAG (include/uapi/linux/dm-ioctl.h).
IMA_DRIVER_MINOR = 45

#: Serialises every libdevmapper call in the process (libdm is not thread-safe).
LIBDM_LOCK = threading.RLock()

# Log levels of libdm (lib/log/log.h): the low 3 bits; errors and warnings become exception text.
_LOG_LEVEL_MASK = 7
_LOG_WARN = 4

# The list collecting libdm's messages during the current _run (guarded by LIBDM_LOCK).
_messages: list[tuple[int, str]] | None = None


def _log_sink(level: int, text: str) -> None:
    lvl = level & _LOG_LEVEL_MASK
    _libdm_log.debug("%d %s", lvl, text)
    if _messages is not None:
        _messages.append((lvl, text))


def check_control(path: str = CONTROL_PATH) -> None:
    """Make sure ``path`` is a device-mapper control node we can open, without asking libdm.

    Raises :class:`KernelUnavailable` naming ``path``, with the errno, when it is missing, not a
    character device or cannot be opened read-write.
    """
    hint = "device-mapper is not available here; the kernel tier runs in a VM: scripts/vmtest"
    try:
        st = os.stat(path)
    except OSError as err:
        reason = "does not exist" if err.errno == errno.ENOENT else err.strerror
        raise KernelUnavailable(f"{path} {reason} ({hint})", errno=err.errno, operation="open") from None
    if not stat.S_ISCHR(st.st_mode):
        raise KernelUnavailable(f"{path} is not a character device ({hint})", errno=errno.ENODEV, operation="open")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM):
            why = "needs root (CAP_SYS_ADMIN)"
        elif err.errno in (errno.ENODEV, errno.ENXIO):
            why = "no device-mapper driver behind it (modprobe dm-mod)"
        else:
            why = hint
        raise KernelUnavailable(f"cannot open {path}: {err.strerror}; {why}", errno=err.errno,
                                operation="open") from None
    os.close(fd)


_libdm: LibDM | None = None


def _real_libdm() -> LibDM:
    """The process's libdevmapper, loaded once, its log routed to :func:`_log_sink`."""
    global _libdm
    with LIBDM_LOCK:
        if _libdm is None:
            dm = LibDM(_ffi.open_library())
            _prepare(dm)
            _libdm = dm
        return _libdm


def _prepare(dm: LibDM) -> None:
    if not dm.log_hooked and not dm.install_log_hook(_log_sink):
        log.warning("libdevmapper messages go to stderr: %s", dm.log_hook_error or "log hook unavailable")


class _KernelLog:
    """Records the kernel appends to its log (``/dev/kmsg``) from now on; empty when unreadable."""

    def __init__(self, path: str = KMSG_PATH) -> None:
        self._fd = -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            os.close(fd)
            return
        self._fd = fd

    def read(self) -> list[str]:
        """The messages logged since opening (Documentation/ABI/testing/dev-kmsg format)."""
        out: list[str] = []
        while self._fd >= 0:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # EPIPE: records were overwritten; continue with the next
                continue
            except OSError:
                break
            if not record:
                break
            _, _, body = record.partition(b";")
            out.append(body.split(b"\n", 1)[0].decode("utf-8", "replace"))
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


#: ``device-mapper: table: 254:0: …``: a line about one mapped device (DMERR with its ``dm_device_name``).
_DEVICE_LINE = re.compile(r"device-mapper: [\w -]+: ([0-9]+:[0-9]+): ")


def kernel_reason(lines: Sequence[str], devno: str | None = None) -> str:
    """The device-mapper lines among kernel log ``lines``, in the kernel's order.

    With ``devno`` (``"254:0"``), lines about another mapped device are dropped; lines of no device
    stay (a dirty log's ``DMWARN`` says why the ``table:`` line's constructor failed). The generic
    ``"error adding target to table"`` is dropped when a specific reason is present.
    """
    dm = [line for line in lines if line.startswith("device-mapper:")]
    if devno:
        dm = [line for line in dm if (m := _DEVICE_LINE.match(line)) is None or m.group(1) == devno]
    specific = [line for line in dm if "error adding target to table" not in line]
    return "; ".join(specific or dm)


#: struct dm_ioctl (include/uapi/linux/dm-ioctl.h), DM_IOCTL_SIZE bytes: what DM_DEV_ARM_POLL takes.
_DM_IOCTL = struct.Struct(f"=3I3Ii3IQ{DM_NAME_LEN}s{DM_UUID_LEN}s7s")


class _EventPoll:
    """Wakes when any device-mapper device raises an event.

    ``arm()`` records the global event counter on our own control fd; ``poll()`` on that fd is
    readable once the counter moved (drivers/md/dm-ioctl.c ``dev_arm_poll``, ``dm_poll``). It does
    not go through libdm, so waiting holds no lock.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def arm(self) -> None:
        buf = bytearray(_DM_IOCTL.pack(4, 37, 0, _DM_IOCTL.size, _DM_IOCTL.size, 0, 0, 0, 0, 0, 0, b"", b"", b""))
        fcntl.ioctl(self.fd, DM_DEV_ARM_POLL, buf)

    def wait(self, timeout: float) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.poll(max(0, int(timeout * 1000)))

    def close(self) -> None:
        os.close(self.fd)


def _table_lines(table: Table | str) -> list[tuple[int, int, str, str]]:
    from dmtools.table import Table  # the typed grammar: only the verbs that carry tables need it

    if isinstance(table, str):
        table = Table.parse(table)
    elif not isinstance(table, Table):
        raise InvalidTable(f"a table is a dmtools.Table or its text, not {type(table).__name__}")
    return [(line.start, line.length, line.target_type, line.params) for line in table.lines]


def _table_from_targets(targets: list[tuple[int, int, str, str]]) -> Table:
    from dmtools.table import Table

    return Table.parse("\n".join(f"{s} {n} {t} {p}" for s, n, t, p in targets))


def _driver_minor(version: str) -> int:
    parts = version.split(".")
    try:
        return int(parts[1]) if parts[0] == "4" else 0
    except (IndexError, ValueError):
        return 0


def _sysfs_uuid(major: int, minor: int) -> str:
    return block_attr((major, minor), "dm/uuid") or ""


class KernelBackend(DeviceMapper):
    """dmsetup's verbs on the kernel's device-mapper, through libdevmapper.

    ``udev_sync``: None (default) synchronises with udev when udevd runs
    (:func:`dmtools.linux.udev_running`); False never does.
    ``udev_timeout`` bounds each wait for udev (seconds); when it passes, the cookie is completed
    here so the semaphore is not leaked, and a warning is logged.

    Raises :class:`KernelUnavailable` (naming ``/dev/mapper/control``) when device-mapper or
    libdevmapper is missing. ``libdm`` replaces the loaded library (tests pass a fake one).
    """

    backend = "kernel"

    def __init__(self, *, udev_sync: bool | None = None, udev_timeout: float = 30.0, control_path: str = CONTROL_PATH,
                 libdm: LibDM | None = None) -> None:
        if libdm is None:
            check_control(control_path)
            libdm = _real_libdm()
        else:
            with LIBDM_LOCK:
                _prepare(libdm)
        self._dm = libdm
        self._control_path = control_path
        self._udev_sync = udev_running() if udev_sync is None else bool(udev_sync)
        self.udev_timeout = udev_timeout

    # -- the one function every call goes through --------------------------------------------

    def _run(self, op: str, task_type: TaskType, device: str | None, setup: Callable[[Task], None] | None = None,
             collect: Callable[[Task], T] | None = None, *, cookie: bool = False, kernel_log: bool = False,
             table_types: Sequence[str] = ()) -> T | None:
        """Create, set up and run one task; return ``collect(task)``; raise a ``DMError``.

        ``cookie`` marks ioctls that emit uevents (resume, remove, rename): they get a udev cookie
        and are waited for. ``kernel_log`` reads the kernel's log lines of the call into errors.
        """
        global _messages
        if device is not None:
            validate_name(device)  # libdm would take a name with "/" for a path and stat it
        with LIBDM_LOCK:
            saved, _messages = _messages, []
            messages = _messages
            klog = _KernelLog() if kernel_log else None
            task: Task | None = None
            started = time.monotonic()
            try:
                self._dm.udev_set_sync_support(self._udev_sync)
                task = self._dm.task(task_type)
                if task is None:
                    raise KernelUnavailable(
                        "libdevmapper cannot use the device-mapper driver: "
                        + (_text(messages) or "dm_task_create failed"),
                        operation=op,
                        device=device,
                    )
                udev_cookie = 0
                try:
                    if device is not None:
                        task.set_name(device)
                    if setup is not None:
                        setup(task)
                    if cookie:
                        udev_cookie = task.set_cookie(self._udev_flags())
                except CallFailed as err:
                    raise InvalidArgument(_text(messages) or str(err), operation=op, device=device) from None
                ok = task.run()
                err_no = 0 if ok else task.errno()
                if cookie:
                    self._udev_wait(udev_cookie)
                log.debug("%s %s: %s in %.1f ms%s", task_type.name.lower(), device or "",
                          "ok" if ok else f"failed ({errno.errorcode.get(err_no, err_no)})",
                          (time.monotonic() - started) * 1000, f", udev cookie {udev_cookie:#x}" if udev_cookie else "")
                if not ok:
                    raise self._error(op, task_type, device, err_no, messages, klog, table_types)
                return collect(task) if collect is not None else None
            finally:
                if task is not None:
                    task.destroy()
                if not cookie:
                    self._dm.update_nodes()
                if klog is not None:
                    klog.close()
                _messages = saved

    def _udev_flags(self) -> int:
        # Without sync, keep udev's dm and subsystem rules away from nodes libdm creates itself,
        # as libdm does for an ioctl without cookie (libdm-iface.c _do_dm_ioctl).
        if self._udev_sync and self._dm.udev_get_sync_support():
            return 0
        return DM_UDEV_DISABLE_DM_RULES_FLAG | DM_UDEV_DISABLE_SUBSYSTEM_RULES_FLAG

    def _udev_wait(self, cookie: int) -> None:
        """Wait (bounded) until udev processed the uevent of ``cookie``; flush node operations.

        Always called after a task that had a cookie, also when it failed, or the SysV semaphore
        leaks (libdm-common.c; moby/moby#9183).
        """
        if cookie == 0:  # sync off: no semaphore; run the stacked node operations now
            self._dm.udev_wait(0)
            return
        if not self._dm.supports("dm_udev_wait_immediate"):  # libdm < 1.02.124: unbounded wait
            self._dm.udev_wait(cookie)
            return
        deadline = time.monotonic() + self.udev_timeout
        delay = 0.002
        while True:
            ok, ready = self._dm.udev_wait_immediate(cookie)
            if not ok or ready:
                if not ok:
                    log.warning("udev cookie %#x: wait failed", cookie)
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "udev did not complete cookie %#x within %.0f s (dm udev rules missing?); "
                    "completing it here",
                    cookie,
                    self.udev_timeout,
                )
                self._dm.udev_complete(cookie)
                self._dm.udev_wait(cookie)
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _error(self, op: str, task_type: TaskType, device: str | None, err: int, messages: list[tuple[int, str]],
               klog: _KernelLog | None, table_types: Sequence[str]) -> DMError:
        """The exception for a failed task: class by errno and task, text from libdm and kernel."""
        text = _text(messages) or (f"device-mapper: {op} failed: {os.strerror(err)}" if err else f"{op} failed")
        kernel_lines = klog.read() if klog is not None else []
        if any("Failure to communicate with kernel device-mapper driver" in m for _, m in messages):
            return KernelUnavailable(text, errno=err or errno.ENODEV, operation=op, device=device)
        if task_type == TaskType.RELOAD:
            return self._load_error(op, device, err, text, kernel_lines, table_types)
        reason = kernel_reason(kernel_lines)
        if reason:
            text = f"{text} (kernel: {reason})"
        if err == 0:
            return InvalidArgument(text, operation=op, device=device)
        if task_type in (TaskType.CREATE, TaskType.RENAME) and err in (errno.EBUSY, errno.EEXIST):
            # dm-ioctl.c dm_hash_insert / dm_hash_rename: a taken name or uuid is -EBUSY.
            return DeviceExists(text, errno=err, operation=op, device=device)
        if err in (errno.ENXIO, errno.ENODEV):
            return DeviceNotFound(text, errno=err, operation=op, device=device)
        if err == errno.EBUSY:
            return DeviceBusy(text, errno=err, operation=op, device=device)
        if err == errno.EINVAL:
            if task_type == TaskType.RESUME:
                # Swapping in the inactive table validates it against its devices (dm.c
                # dm_swap_table → dm_calculate_queue_limits): "too small for target" and the like.
                return InvalidTable(text, errno=err, operation=op, device=device)
            return InvalidArgument(text, errno=err, operation=op, device=device)
        return from_errno(err, text, operation=op, device=device)

    def _load_error(self, op: str, device: str | None, err: int, text: str, kernel_lines: list[str],
                    table_types: Sequence[str]) -> DMError:
        devno = None
        exists = True
        if device is not None and err in (errno.ENXIO, errno.ENODEV, errno.ENOENT, errno.EINVAL):
            info = self._info_or_none(device)
            exists = info is not None
            devno = f"{info.major}:{info.minor}" if info is not None else None
        reason = kernel_reason(kernel_lines, devno)
        if reason:
            text = f"{text} (kernel: {reason})"
        if not exists and not reason:
            return DeviceNotFound(text, errno=err or errno.ENXIO, operation=op, device=device)
        if err == errno.EBUSY:
            return DeviceBusy(text, errno=err, operation=op, device=device)
        if err == errno.ENOMEM:
            return from_errno(err, text, operation=op, device=device)
        if "unknown target type" in reason:
            return TargetNotSupported(text, errno=err or errno.EINVAL, operation=op, device=device)
        if err == errno.EINVAL and table_types and not reason:
            # Without the kernel log: a type the kernel still does not list after trying to load
            # its module (dm-target.c dm_get_target_type → request_module) is not supported.
            missing = self._missing_types(table_types)
            if missing:
                return TargetNotSupported(f"{text} (the kernel has no target type {', '.join(missing)})", errno=err,
                                          operation=op, device=device)
        return InvalidTable(text, errno=err or errno.EINVAL, operation=op, device=device)

    def _missing_types(self, table_types: Sequence[str]) -> list[str]:
        try:
            known = self.targets()
        except DMError:
            return []
        if not known:  # nothing listed at all tells nothing about the table
            return []
        return sorted({t for t in table_types if t not in known})

    def _info_or_none(self, name: str) -> Info | None:
        try:
            info = self._run("info", TaskType.INFO, name, collect=lambda t: t.info())
        except DMError:
            return None
        return info if info is not None and info.exists else None

    # -- verbs ---------------------------------------------------------------------------------

    def create(self, name: str, table: Table | str | None = None, *, uuid: str = "",
               readonly: bool = False) -> DeviceInfo:
        """Create ``name``, empty or with ``table`` live (create → load → resume).

        All or nothing: when the load or resume fails the new device is removed again. Raises
        :class:`DeviceExists`, :class:`InvalidTable` (with the kernel's reason),
        :class:`TargetNotSupported`, :class:`InvalidName`, :class:`InvalidArgument`.
        """
        validate_name(name)
        if uuid:
            validate_uuid(uuid)
        lines = _table_lines(table) if table is not None else []
        if readonly and not lines:
            raise InvalidArgument("read-only applies to a table; create with a table or load one with readonly=True",
                                  operation="create", device=name)

        def setup(task: Task) -> None:
            if uuid:
                task.set_uuid(uuid)

        with LIBDM_LOCK:
            self._run("create", TaskType.CREATE, name, setup)
            if lines:
                try:
                    self._load("create", name, lines, readonly)
                    self._run("create", TaskType.RESUME, name, cookie=True, kernel_log=True)
                except BaseException as exc:  # also KeyboardInterrupt: leave nothing half-made
                    try:
                        self.remove(name, retry=True)
                    except DMError as undo:
                        exc.add_note(f"the new device {name} could not be removed again: {undo}")
                    raise
            return self.info(name)

    def _load(self, op: str, name: str, lines: list[tuple[int, int, str, str]], readonly: bool) -> None:
        if not lines:
            raise InvalidTable("a table needs at least one target", operation=op, device=name)

        def setup(task: Task) -> None:
            for start, length, target_type, params in lines:
                task.add_target(start, length, target_type, params)
            if readonly:
                task.set_ro()

        self._run(op, TaskType.RELOAD, name, setup, kernel_log=True, table_types=sorted({line[2] for line in lines}))

    def load(self, name: str, table: Table | str, *, readonly: bool = False) -> None:
        """Load ``table`` into the inactive slot of ``name`` (``resume`` makes it live).

        Raises :class:`DeviceNotFound`, :class:`InvalidTable` carrying the kernel's reason,
        :class:`TargetNotSupported`.
        """
        self._load("load", name, _table_lines(table), readonly)

    def suspend(self, name: str, *, noflush: bool = False) -> None:
        """Suspend ``name`` (``noflush``: queue, do not flush, outstanding I/O).

        Raises :class:`DeviceNotFound`.
        """

        def setup(task: Task) -> None:
            if noflush:
                task.no_flush()

        self._run("suspend", TaskType.SUSPEND, name, setup)

    def resume(self, name: str) -> None:
        """Resume ``name``, making a loaded inactive table live. Raises :class:`DeviceNotFound`."""
        self._run("resume", TaskType.RESUME, name, cookie=True, kernel_log=True)

    def remove(self, name: str, *, retry: bool = False, deferred: bool = False) -> None:
        """Remove ``name``.

        ``retry`` retries for about 5 s while the device is busy (udev or a scanner holding it
        briefly, as libdm's ``dm_task_retry_remove``); ``deferred`` lets the kernel remove an open
        device at its last close. Raises :class:`DeviceBusy` (open) or :class:`DeviceNotFound`.
        """

        def setup(task: Task) -> None:
            if deferred:
                task.deferred_remove()

        tries = REMOVE_RETRIES if retry else 0
        deadline = time.monotonic() + tries * REMOVE_RETRY_DELAY
        attempt = 0
        while True:
            try:
                self._run("remove", TaskType.REMOVE, name, setup, cookie=True)
                return
            except DeviceBusy:
                # Retried REMOVE_RETRIES times at least, and for REMOVE_RETRIES x REMOVE_RETRY_DELAY
                # seconds at least (libdm's dm_task_retry_remove bounds).
                attempt += 1
                if attempt > tries and time.monotonic() >= deadline:
                    raise
                left = max(0.0, deadline - time.monotonic())
                # Wait for the openers to go (the open count, polled), then try again at once;
                # a device busy with nobody holding it open gets the short pause libdm makes.
                try:
                    count = wait_closed(self, name, left)
                except DeviceNotFound:
                    count = 0  # gone meanwhile: the next try reports it
                log.debug("remove %s: busy, %d openers after waiting", name, count)
                if count:
                    raise
                time.sleep(min(REMOVE_RETRY_DELAY / 10, max(0.0, deadline - time.monotonic())))

    def clear(self, name: str) -> None:
        """Drop the inactive table of ``name``. Raises :class:`DeviceNotFound`."""
        self._run("clear", TaskType.CLEAR, name)

    def rename(self, name: str, new_name: str) -> None:
        """Rename ``name`` to ``new_name``. Raises :class:`DeviceNotFound`, :class:`DeviceExists`."""
        validate_name(new_name)
        self._run("rename", TaskType.RENAME, name, lambda t: t.set_newname(new_name), cookie=True)

    def _info(self, op: str, name: str) -> tuple[Info, str, str]:
        def collect(task: Task) -> tuple[Info | None, str, str]:
            return task.info(), task.name() or name, task.uuid() or ""

        result = self._run(op, TaskType.INFO, name, collect=collect)
        assert result is not None
        info, real_name, uuid = result
        if info is None or not info.exists:
            raise DeviceNotFound("no such device", errno=errno.ENXIO, operation=op, device=name)
        return info, real_name, uuid

    def info(self, name: str, *, open_count: bool = True) -> DeviceInfo:
        """``dmsetup info``. Raises :class:`DeviceNotFound`. The open count costs nothing here:
        it is always reported."""
        info, real_name, uuid = self._info("info", name)
        # Info has the fields of struct dm_info, which DeviceInfo carries under the same names.
        return DeviceInfo(name=real_name, uuid=uuid, **info._asdict())

    def _targets_of(self, op: str, task_type: TaskType, name: str, inactive: bool, *,
                    ima: bool = False) -> list[tuple[int, int, str, str]]:
        def setup(task: Task) -> None:
            if inactive:
                task.query_inactive_table()
            if ima:
                task.ima_measurement()

        def collect(task: Task) -> tuple[Info | None, list[tuple[int, int, str, str]]]:
            if ima and _driver_minor(task.driver_version()) < IMA_DRIVER_MINOR:
                # An older driver ignores DM_IMA_MEASUREMENT_FLAG and returns STATUSTYPE_INFO.
                raise TargetNotSupported(
                    f"the kernel's device-mapper {task.driver_version()} cannot report IMA "
                    f"measurements (needs dm-ioctl 4.{IMA_DRIVER_MINOR}, Linux 5.15)",
                    operation=op,
                    device=name,
                )
            return task.info(), task.targets()

        result = self._run(op, task_type, name, setup, collect)
        assert result is not None
        info, targets = result
        # STATUS on a missing device is not an error to libdm: it only clears "exists".
        if info is None or not info.exists:
            raise DeviceNotFound("no such device", errno=errno.ENXIO, operation=op, device=name)
        return targets

    def table(self, name: str, *, inactive: bool = False) -> Table:
        """The live (or inactive) table, devices as ``major:minor``. Raises :class:`DeviceNotFound`."""
        return _table_from_targets(self._targets_of("table", TaskType.TABLE, name, inactive))

    def status(self, name: str, *, inactive: bool = False) -> list[StatusLine]:
        """Each target's status line. Raises :class:`DeviceNotFound`."""
        return [
            StatusLine(start, length, target_type, params)
            for start, length, target_type, params in self._targets_of("status", TaskType.STATUS, name, inactive)
        ]

    def measure(self, name: str, *, inactive: bool = False) -> list[StatusLine]:
        """Each target's IMA measurement text, as ``dmsetup measure`` (STATUSTYPE_IMA).

        Raises :class:`DeviceNotFound`, or :class:`TargetNotSupported` when libdevmapper lacks
        ``dm_task_ima_measurement`` (before 1.02.181) or the driver predates
        ``DM_IMA_MEASUREMENT_FLAG`` (dm-ioctl 4.45).
        """
        if not self._dm.supports("dm_task_ima_measurement"):
            with LIBDM_LOCK:
                library = self._dm.library_version()
            raise TargetNotSupported(f"libdevmapper {library} has no dm_task_ima_measurement (needs 1.02.181 or later)",
                                     operation="measure", device=name)
        return [
            StatusLine(start, length, target_type, params)
            for start, length, target_type, params in self._targets_of(
                "measure", TaskType.STATUS, name, inactive, ima=True
            )
        ]

    def message(self, name: str, sector: int, message: str) -> str | None:
        """Send ``message`` to the target at ``sector``; return its response, if any.

        Raises :class:`DeviceNotFound`, or :class:`InvalidArgument` with the kernel's reason (for
        instance a target that takes no messages).
        """
        if sector < 0:
            raise InvalidArgument(f"sector {sector} is negative", operation="message", device=name)
        if not message:
            raise InvalidArgument("empty message", operation="message", device=name)

        def setup(task: Task) -> None:
            task.set_sector(sector)
            task.set_message(message)

        return self._run("message", TaskType.TARGET_MSG, name, setup, lambda t: t.message_response() or None,
                         kernel_log=True)

    def deps(self, name: str) -> list[tuple[int, int]]:
        """``(major, minor)`` of every device the live table uses. Raises :class:`DeviceNotFound`."""
        devs = self._run("deps", TaskType.DEPS, name, collect=lambda t: t.deps())
        assert devs is not None
        # Kernel huge encoding (libdm/misc/kdev_t.h).
        return [((d & 0xFFF00) >> 8, (d & 0xFF) | ((d >> 12) & 0xFFF00)) for d in devs]

    def list(self) -> list[DeviceEntry]:
        """Every device with its number, event number (dm-ioctl >= 4.37) and uuid."""

        def collect(task: Task) -> list[_ffi.NameRecord]:
            return task.names(has_event_nr=_driver_minor(task.driver_version()) >= 37)

        records = self._run("list", TaskType.LIST, None, collect=collect)
        assert records is not None
        return [
            DeviceEntry(name=r.name, major=r.major, minor=r.minor, event_nr=r.event_nr or 0,
                        uuid=r.uuid if r.uuid is not None else _sysfs_uuid(r.major, r.minor))
            for r in records
        ]

    def targets(self) -> dict[str, tuple[int, int, int]]:
        """Loaded target types and their versions (``dmsetup targets``)."""
        versions = self._run("targets", TaskType.LIST_VERSIONS, None, collect=lambda t: t.versions())
        assert versions is not None
        return dict(versions)

    def version(self) -> Versions:
        """libdevmapper's and the driver's versions."""
        with LIBDM_LOCK:
            library = self._dm.library_version()
        driver = self._run("version", TaskType.VERSION, None, collect=lambda t: t.driver_version())
        return Versions(library=library, driver=driver or "", backend=self.backend)

    def wait_event(self, name: str, event_nr: int = 0, timeout: float | None = None) -> int:
        """Wait until the event number of ``name`` differs from ``event_nr``; return it.

        As the kernel's DM_DEV_WAIT, "differs" (the counter is 32 bits and wraps). Waiting holds
        no lock: it polls our own control fd armed with DM_DEV_ARM_POLL (dm-ioctl >= 4.37), or
        re-reads every 50 ms on older kernels. With ``timeout`` (seconds) it returns the unchanged
        number when the time is up. Raises :class:`DeviceNotFound`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        # Follow the device, not the name: a rename (which raises an event) must not lose it.
        first = self.info(name)
        if first.event_nr != event_nr:
            return first.event_nr
        major, minor = first.major, first.minor
        try:
            poll: _EventPoll | None = _EventPoll(self._control_path)
        except OSError:
            poll = None
        try:
            while True:
                if poll is not None:
                    try:
                        poll.arm()
                    except OSError as err:
                        log.debug("DM_DEV_ARM_POLL unavailable (%s); polling info", err)
                        poll.close()
                        poll = None
                current = self._event_nr(name, major, minor)
                if current != event_nr:
                    return current
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return current
                step = 3600.0 if remaining is None else remaining
                if poll is not None:
                    poll.wait(step)
                else:
                    time.sleep(min(step, 0.05))
        finally:
            if poll is not None:
                poll.close()

    def _event_nr(self, name: str, major: int, minor: int) -> int:
        def collect(task: Task) -> Info | None:
            return task.info()

        info = self._run("wait_event", TaskType.INFO, None, lambda t: t.set_major_minor(major, minor), collect)
        if info is None or not info.exists:
            raise DeviceNotFound(
                f"device {major}:{minor} was removed", errno=errno.ENXIO, operation="wait_event",
                device=name,
            )
        return info.event_nr

    def device_path(self, name: str) -> str:
        """``/dev/mapper/NAME`` (the name mangled as libdevmapper names the node)."""
        validate_name(name)
        return os.path.join(MAPPER_DIR, mangle(name))

    def device_ref(self, name: str) -> str:
        """``major:minor`` of ``name``, for use in another table. Raises :class:`DeviceNotFound`."""
        return self.info(name).devno

    def open_endpoint(self, name: str, *, writable: bool = True) -> Endpoint:
        """Open ``/dev/mapper/NAME`` for I/O. Raises :class:`DeviceNotFound`."""
        from dmtools.blockdev import BlockDevice

        self.info(name)
        return BlockDevice(self.device_path(name), writable=writable)

    def close(self) -> None:
        """Flush libdm's node operations and close its control fd (reopened on next use)."""
        with LIBDM_LOCK:
            self._dm.release()


def _text(messages: list[tuple[int, str]]) -> str:
    """libdm's errors and warnings of one call, as exception text."""
    return "; ".join(text for level, text in messages if level <= _LOG_WARN)
