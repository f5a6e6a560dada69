"""Unit tier of the kernel backend: a fake libdevmapper at the ``LibDM`` seam, synthetic buffers.

The fake implements the C function names ``dmtools._ffi`` calls and records every call with its
arguments as libdm would receive them (``bytes`` for strings), so these tests check exactly what
reaches C. Buffers for LIST, LIST_VERSIONS and DEPS results are laid out with cffi the way the
kernel lays them out (drivers/md/dm-ioctl.c).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import dmtools
import dmtools._ffi as ffimod
from dmtools import kernel
from dmtools._ffi import LibDM, NameRecord, TaskType, ffi, parse_deps, parse_names, parse_versions
from dmtools.errors import (DeviceBusy, DeviceExists, DeviceNotFound, DMError, InvalidArgument, InvalidName,
                            InvalidTable, KernelUnavailable, TargetNotSupported)
from dmtools.kernel import KernelBackend, kernel_reason
from dmtools.table import Table

COOKIE = 0x0D4D1234


def _py(arg: Any) -> Any:
    """A C argument as a comparable Python value."""
    if isinstance(arg, (bytes, int)):
        return arg
    return "ptr"


@dataclass
class FakeTask:
    type: TaskType
    keep: Any
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    info: dict[str, int] | None = None
    targets: list[tuple[int, int, bytes, bytes]] = field(default_factory=list)
    buffer: Any = None
    response: bytes | None = None
    name: bytes = b""
    uuid: bytes = b""
    strings: list[Any] = field(default_factory=list)

    def called(self, fn: str) -> list[tuple[Any, ...]]:
        return [args for name, args in self.calls if name == fn]


def _lock_free_in_other_thread() -> bool:
    got: list[bool] = []

    def probe() -> None:
        ok = kernel.LIBDM_LOCK.acquire(blocking=False)
        if ok:
            kernel.LIBDM_LOCK.release()
        got.append(ok)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join(10)
    return got[0]


class FakeLib:
    """libdevmapper's C functions as ``dmtools._ffi`` calls them; ``on_run`` scripts the result."""

    def __init__(self) -> None:
        self.tasks: list[FakeTask] = []
        self.by_addr: dict[int, FakeTask] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.log_fn: Any = None
        self.sync = 0
        self.ready_after = 1  # dm_udev_wait_immediate polls until ready
        self.create_null = False
        self.destroyed: list[int] = []
        self.check_lock = False
        self.lock_free_elsewhere: list[bool] = []
        # on_run(task) -> (result, errno, [(level, message)]); default: success.
        self.on_run: Callable[[FakeTask], tuple[int, int, list[tuple[int, bytes]]]] = lambda t: (1, 0, [])

    def _rec(self, fn: str, *args: Any) -> None:
        self.calls.append((fn, tuple(_py(a) for a in args)))

    def _task(self, ptr: Any) -> FakeTask:
        return self.by_addr[int(ffi.cast("uintptr_t", ptr))]

    def _trec(self, fn: str, ptr: Any, *args: Any) -> int:
        self._task(ptr).calls.append((fn, tuple(_py(a) for a in args)))
        return 1

    # logging
    def dm_log_init(self, fn: Any) -> None:
        self.log_fn = fn

    # lifecycle
    def dm_task_create(self, task_type: int) -> Any:
        self._rec("dm_task_create", task_type)
        if self.create_null:
            return ffi.NULL
        keep = ffi.new("char[16]")
        task = FakeTask(TaskType(task_type), keep)
        self.tasks.append(task)
        self.by_addr[int(ffi.cast("uintptr_t", keep))] = task
        return ffi.cast("struct dm_task *", keep)

    def dm_task_destroy(self, ptr: Any) -> None:
        assert ptr != ffi.NULL
        self.destroyed.append(int(ffi.cast("uintptr_t", ptr)))

    def dm_task_run(self, ptr: Any) -> int:
        if self.check_lock:
            self.lock_free_elsewhere.append(_lock_free_in_other_thread())
        task = self._task(ptr)
        task.calls.append(("dm_task_run", ()))
        result, err, logs = self.on_run(task)
        task.errno_value = err  # type: ignore[attr-defined]
        for level, text in logs:
            if self.log_fn is not None:  # else libdm would print it on stderr
                self.log_fn(level, b"libdm-iface.c", 1, b"%s", text)
        return result

    def dm_task_get_errno(self, ptr: Any) -> int:
        return getattr(self._task(ptr), "errno_value", 0)

    # setters
    def __getattr__(self, fn: str) -> Any:
        if fn.startswith("dm_task_set_") or fn in (
            "dm_task_no_flush",
            "dm_task_deferred_remove",
            "dm_task_query_inactive_table",
            "dm_task_add_target",
        ):
            return lambda ptr, *args: self._trec(fn, ptr, *args)
        raise AttributeError(fn)

    def dm_task_set_cookie(self, ptr: Any, cookie: Any, flags: int) -> int:
        self._trec("dm_task_set_cookie", ptr, int(cookie[0]), flags)
        cookie[0] = COOKIE if self.sync else 0
        return 1

    # results
    def dm_task_get_info(self, ptr: Any, dmi: Any) -> int:
        task = self._task(ptr)
        if task.info is None:
            return 0
        for key, value in task.info.items():
            setattr(dmi, key, value)
        return 1

    def dm_task_get_name(self, ptr: Any) -> Any:
        task = self._task(ptr)
        s = ffi.new("char[]", task.name)
        task.strings.append(s)
        return s

    def dm_task_get_uuid(self, ptr: Any) -> Any:
        task = self._task(ptr)
        s = ffi.new("char[]", task.uuid)
        task.strings.append(s)
        return s

    def dm_get_next_target(self, ptr: Any, nxt: Any, start: Any, length: Any, ttype: Any, params: Any) -> Any:
        task = self._task(ptr)
        index = 0 if nxt == ffi.NULL else int(ffi.cast("uintptr_t", nxt))
        if not task.targets:
            start[0] = length[0] = 0
            ttype[0] = params[0] = ffi.NULL
            return ffi.NULL
        s, n, t, p = task.targets[index]
        start[0], length[0] = s, n
        ts, ps = ffi.new("char[]", t), ffi.new("char[]", p)
        task.strings += [ts, ps]
        ttype[0], params[0] = ts, ps
        return ffi.NULL if index + 1 == len(task.targets) else ffi.cast("void *", index + 1)

    def dm_task_get_deps(self, ptr: Any) -> Any:
        buffer = self._task(ptr).buffer
        return ffi.NULL if buffer is None else ffi.cast("struct dm_deps *", buffer)

    def dm_task_get_names(self, ptr: Any) -> Any:
        buffer = self._task(ptr).buffer
        return ffi.NULL if buffer is None else ffi.cast("struct dm_names *", buffer)

    def dm_task_get_versions(self, ptr: Any) -> Any:
        buffer = self._task(ptr).buffer
        return ffi.NULL if buffer is None else ffi.cast("struct dm_versions *", buffer)

    def dm_task_get_message_response(self, ptr: Any) -> Any:
        task = self._task(ptr)
        if task.response is None:
            return ffi.NULL
        s = ffi.new("char[]", task.response)
        task.strings.append(s)
        return s

    def dm_task_get_driver_version(self, ptr: Any, buf: Any, size: int) -> int:
        ffi.memmove(buf, b"4.47.0\0", 7)
        return 1

    # library
    def dm_get_library_version(self, buf: Any, size: int) -> int:
        ffi.memmove(buf, b"1.02.185 (fake)\0", 16)
        return 1

    def dm_udev_set_sync_support(self, value: int) -> None:
        self._rec("dm_udev_set_sync_support", value)

    def dm_udev_get_sync_support(self) -> int:
        return self.sync

    def dm_udev_wait(self, cookie: int) -> int:
        self._rec("dm_udev_wait", cookie)
        return 1

    def dm_udev_wait_immediate(self, cookie: int, ready: Any) -> int:
        self._rec("dm_udev_wait_immediate", cookie)
        self.ready_after -= 1
        ready[0] = 1 if self.ready_after <= 0 else 0
        return 1

    def dm_udev_complete(self, cookie: int) -> int:
        self._rec("dm_udev_complete", cookie)
        return 1

    def dm_task_update_nodes(self) -> None:
        self._rec("dm_task_update_nodes")

    def dm_lib_release(self) -> None:
        self._rec("dm_lib_release")

    # helpers for assertions
    def of_type(self, task_type: TaskType) -> list[FakeTask]:
        return [t for t in self.tasks if t.type == task_type]


@pytest.fixture
def fake() -> FakeLib:
    return FakeLib()


@pytest.fixture
def dm(fake: FakeLib) -> KernelBackend:
    return KernelBackend(libdm=LibDM(fake), udev_sync=False)


def _info(**kw: int) -> dict[str, int]:
    base = dict(exists=1, major=254, minor=3, live_table=1, target_count=1)
    base.update(kw)
    return base


OnRun = Callable[[FakeTask], tuple[int, int, list[tuple[int, bytes]]]]


def _fail(err: int, text: bytes, types: tuple[TaskType, ...]) -> OnRun:
    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        if task.type in types:
            return 0, err, [(3, text)]
        if task.type == TaskType.INFO:
            task.info = _info()
            task.name = b"x-dmtt"
        return 1, 0, []

    return on_run


def _with_versions(base: OnRun, items: list[tuple[str, tuple[int, int, int]]]) -> OnRun:
    """``base``, with LIST_VERSIONS answering ``items``."""
    versions = build_versions(items)

    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        if task.type == TaskType.LIST_VERSIONS:
            task.buffer = versions
        return base(task)

    return on_run


# ---------------------------------------------------------------------------------------------
# synthetic kernel buffers


def build_names(records: list[tuple[str, int, int | None, str | None]], *, flags_field: bool = True) -> Any:
    """A LIST result laid out as drivers/md/dm-ioctl.c list_devices does (dm-ioctl 4.45+)."""
    buf = bytearray()
    starts = []
    for name, dev, event_nr, uuid in records:
        start = len(buf)
        starts.append(start)
        rec = bytearray(dev.to_bytes(8, "little") + b"\0\0\0\0" + name.encode() + b"\0")
        rec += b"\0" * (-len(rec) % 8)
        if event_nr is not None:
            flags = 0
            if flags_field and uuid is not None:
                flags = 1
            elif flags_field:
                flags = 2
            rec += event_nr.to_bytes(4, "little") + flags.to_bytes(4, "little")
            if uuid is not None:
                rec += uuid.encode() + b"\0"
                rec += b"\0" * (-len(rec) % 8)
        buf += rec
    for i in range(len(starts) - 1):
        buf[starts[i] + 8 : starts[i] + 12] = (starts[i + 1] - starts[i]).to_bytes(4, "little")
    if not buf:
        buf = bytearray(16)
    cbuf = ffi.new("char[]", bytes(buf))
    assert int(ffi.cast("uintptr_t", cbuf)) % 8 == 0
    return cbuf


def build_versions(items: list[tuple[str, tuple[int, int, int]]]) -> Any:
    buf = bytearray()
    starts = []
    for name, (a, b, c) in items:
        starts.append(len(buf))
        rec = bytearray(b"\0\0\0\0" + a.to_bytes(4, "little") + b.to_bytes(4, "little") + c.to_bytes(4, "little"))
        rec += name.encode() + b"\0"
        rec += b"\0" * (-len(rec) % 8)
        buf += rec
    for i in range(len(starts) - 1):
        buf[starts[i] : starts[i] + 4] = (starts[i + 1] - starts[i]).to_bytes(4, "little")
    return ffi.new("char[]", bytes(buf))


def build_deps(devs: list[int]) -> Any:
    raw = len(devs).to_bytes(4, "little") + b"\0" * 4 + b"".join(d.to_bytes(8, "little") for d in devs)
    return ffi.new("char[]", raw)


def test_struct_layouts_match_libdevmapper() -> None:
    # libdevmapper.h: the 12-field dm_info of DM_1_02_97 is 48 bytes; flexible arrays' offsets.
    assert ffi.sizeof("struct dm_info") == 48
    assert ffi.offsetof("struct dm_names", "name") == 12
    assert ffi.offsetof("struct dm_versions", "name") == 16
    assert ffi.offsetof("struct dm_deps", "device") == 8
    lib = ffimod.open_library()  # loading runs libdm's constructor only; no driver access
    for member in TaskType:
        assert getattr(lib, f"DM_DEVICE_{member.name}") == member.value


def test_parse_names_with_event_numbers_and_uuids() -> None:
    dev_a = (254 << 8) | 0
    dev_b = ((1000 & 0xFFF) << 8) | (300 & 0xFF) | ((300 & ~0xFF) << 12)
    buf = build_names([("abc", dev_a, 7, "UUID-1"), ("a-much-longer-name", dev_b, 0, None)])
    recs = parse_names(ffi.cast("struct dm_names *", buf), has_event_nr=True)
    assert recs == [NameRecord("abc", dev_a, 7, "UUID-1"), NameRecord("a-much-longer-name", dev_b, 0, None)]
    assert (recs[0].major, recs[0].minor) == (254, 0)
    assert (recs[1].major, recs[1].minor) == (1000, 300)


def test_parse_names_without_event_numbers_and_empty() -> None:
    buf = build_names([("x", 1 << 8, None, None), ("yy", 2 << 8, None, None)])
    recs = parse_names(ffi.cast("struct dm_names *", buf), has_event_nr=False)
    assert [(r.name, r.event_nr, r.uuid) for r in recs] == [("x", None, None), ("yy", None, None)]
    empty = build_names([])
    assert parse_names(ffi.cast("struct dm_names *", empty), has_event_nr=True) == []


def test_parse_names_old_kernel_flags_zero_means_no_uuid() -> None:
    buf = build_names([("old", 5 << 8, 3, None)], flags_field=False)
    (rec,) = parse_names(ffi.cast("struct dm_names *", buf), has_event_nr=True)
    assert (rec.name, rec.event_nr, rec.uuid) == ("old", 3, None)


def test_parse_versions_and_deps() -> None:
    buf = build_versions([("linear", (1, 4, 0)), ("snapshot-origin", (1, 9, 0)), ("zero", (1, 2, 0))])
    assert parse_versions(ffi.cast("struct dm_versions *", buf)) == [
        ("linear", (1, 4, 0)),
        ("snapshot-origin", (1, 9, 0)),
        ("zero", (1, 2, 0)),
    ]
    deps = build_deps([(7 << 8) | 1, (259 << 8) | 2])
    assert parse_deps(ffi.cast("struct dm_deps *", deps)) == [(7 << 8) | 1, (259 << 8) | 2]
    assert parse_deps(ffi.NULL) == []


# ---------------------------------------------------------------------------------------------
# what reaches C


def test_create_with_table_is_create_load_resume(dm: KernelBackend, fake: FakeLib) -> None:
    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        if task.type == TaskType.INFO:
            task.info = _info()
            task.name, task.uuid = b"a-dmtt", b"U-1"
        return 1, 0, []

    fake.on_run = on_run
    info = dm.create("a-dmtt", "0 100 linear /dev/loop0 0\n100 50 zero", uuid="U-1", readonly=True)
    assert [t.type for t in fake.tasks] == [TaskType.CREATE, TaskType.RELOAD, TaskType.RESUME, TaskType.INFO]
    create, reload, resume, _ = fake.tasks
    assert create.calls == [("dm_task_set_name", (b"a-dmtt",)), ("dm_task_set_uuid", (b"U-1",)), ("dm_task_run", ())]
    # No targets on the CREATE task: libdm's own create-and-load would hide the load's errno.
    assert not create.called("dm_task_add_target")
    assert reload.calls == [
        ("dm_task_set_name", (b"a-dmtt",)),
        ("dm_task_add_target", (0, 100, b"linear", b"/dev/loop0 0")),
        ("dm_task_add_target", (100, 50, b"zero", b"")),
        ("dm_task_set_ro", ()),
        ("dm_task_run", ()),
    ]
    assert resume.called("dm_task_set_cookie") == [(0, 0x3)]  # no udev: dm and subsystem rules off
    assert info.name == "a-dmtt" and info.uuid == "U-1" and info.devno == "254:3"
    assert len(fake.destroyed) == 4


def test_create_rolls_back_when_load_fails(dm: KernelBackend, fake: FakeLib, capfd: pytest.CaptureFixture[str]) -> None:
    text = b"device-mapper: reload ioctl on a-dmtt  failed: Invalid argument"
    fake.on_run = _with_versions(_fail(errno.EINVAL, text, (TaskType.RELOAD,)), [("linear", (1, 4, 0))])
    with pytest.raises(InvalidTable) as exc:
        dm.create("a-dmtt", "0 100 linear /dev/loop0 0")
    assert exc.value.errno == errno.EINVAL
    assert exc.value.operation == "create" and exc.value.device == "a-dmtt"
    assert text.decode() in str(exc.value)
    types = [t.type for t in fake.tasks]
    assert types[:2] == [TaskType.CREATE, TaskType.RELOAD]
    assert TaskType.RESUME not in types
    assert types[-1] == TaskType.REMOVE  # the rollback
    assert fake.tasks[-1].called("dm_task_set_name") == [(b"a-dmtt",)]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_unknown_target_type_is_target_not_supported(dm: KernelBackend, fake: FakeLib) -> None:
    fail = _fail(errno.EINVAL, b"device-mapper: reload ioctl on x-dmtt  failed: Invalid argument", (TaskType.RELOAD,))
    fake.on_run = _with_versions(fail, [("linear", (1, 4, 0)), ("striped", (1, 6, 0))])
    with pytest.raises(TargetNotSupported) as exc:
        dm.load("x-dmtt", "0 8 frobnicate 1 2")
    assert "frobnicate" in str(exc.value)


def test_load_on_missing_device_is_device_not_found(dm: KernelBackend, fake: FakeLib) -> None:
    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        if task.type == TaskType.RELOAD:
            return 0, errno.ENXIO, [(3, b"device-mapper: reload ioctl on x-dmtt  failed: No such device or address")]
        task.info = {"exists": 0}
        return 1, 0, []

    fake.on_run = on_run
    with pytest.raises(DeviceNotFound):
        dm.load("x-dmtt", "0 8 zero")


@pytest.mark.parametrize(
    ("verb", "task_type", "err", "expected"),
    [
        (lambda dm: dm.suspend("x-dmtt"), TaskType.SUSPEND, errno.ENXIO, DeviceNotFound),
        (lambda dm: dm.resume("x-dmtt"), TaskType.RESUME, errno.EINVAL, InvalidTable),
        (lambda dm: dm.create("x-dmtt"), TaskType.CREATE, errno.EBUSY, DeviceExists),
        (lambda dm: dm.rename("x-dmtt", "y-dmtt"), TaskType.RENAME, errno.EBUSY, DeviceExists),
        (lambda dm: dm.remove("x-dmtt"), TaskType.REMOVE, errno.EBUSY, DeviceBusy),
        (lambda dm: dm.clear("x-dmtt"), TaskType.CLEAR, errno.ENXIO, DeviceNotFound),
        (lambda dm: dm.message("x-dmtt", 0, "hi"), TaskType.TARGET_MSG, errno.EINVAL, InvalidArgument),
        (lambda dm: dm.table("x-dmtt"), TaskType.TABLE, errno.ENXIO, DeviceNotFound),
        (lambda dm: dm.deps("x-dmtt"), TaskType.DEPS, errno.ENXIO, DeviceNotFound),
    ],
)
def test_errno_maps_per_operation(dm: KernelBackend, fake: FakeLib, verb: Callable[[KernelBackend], Any],
                                  task_type: TaskType, err: int, expected: type) -> None:
    text = f"device-mapper: op ioctl on x-dmtt  failed: {os.strerror(err)}".encode()
    fake.on_run = _fail(err, text, (task_type,))
    with pytest.raises(DMError) as exc:
        verb(dm)
    assert type(exc.value) is expected
    assert exc.value.errno == err
    assert text.decode() in exc.value.message


def test_failure_before_the_ioctl_is_invalid_argument(dm: KernelBackend, fake: FakeLib) -> None:
    fake.on_run = _fail(0, b"targets and message are incompatible", (TaskType.TARGET_MSG,))
    with pytest.raises(InvalidArgument, match="incompatible"):
        dm.message("x-dmtt", 0, "hi")


def test_null_task_is_kernel_unavailable_and_never_destroyed(dm: KernelBackend, fake: FakeLib) -> None:
    fake.create_null = True
    with pytest.raises(KernelUnavailable):
        dm.info("x-dmtt")
    assert fake.destroyed == []


def test_names_are_validated_before_c(dm: KernelBackend, fake: FakeLib) -> None:
    with pytest.raises(InvalidName):
        dm.create("a/b")
    with pytest.raises(InvalidName):
        dm.rename("ok-dmtt", "x" * 200)
    with pytest.raises(InvalidName):
        dm.info("../sda")
    with pytest.raises(InvalidName):
        dm.remove("")
    assert fake.tasks == []


def test_suspend_noflush_message_remove_deferred_arguments(dm: KernelBackend, fake: FakeLib) -> None:
    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        if task.type == TaskType.TARGET_MSG:
            task.response = b"answer 42"
        return 1, 0, []

    fake.on_run = on_run
    dm.suspend("x-dmtt", noflush=True)
    assert dm.message("x-dmtt", 8, "set_option x 1") == "answer 42"
    dm.remove("x-dmtt", deferred=True)
    suspend, message, remove = fake.tasks
    assert suspend.calls == [("dm_task_set_name", (b"x-dmtt",)), ("dm_task_no_flush", ()), ("dm_task_run", ())]
    assert message.calls == [
        ("dm_task_set_name", (b"x-dmtt",)),
        ("dm_task_set_sector", (8,)),
        ("dm_task_set_message", (b"set_option x 1",)),
        ("dm_task_run", ()),
    ]
    assert remove.called("dm_task_deferred_remove") == [()]
    # suspend and message emit no uevent: no cookie; remove does.
    assert not suspend.called("dm_task_set_cookie") and not message.called("dm_task_set_cookie")
    assert remove.called("dm_task_set_cookie") == [(0, 0x3)]


def test_message_without_response_is_none(dm: KernelBackend, fake: FakeLib) -> None:
    assert dm.message("x-dmtt", 0, "noop") is None


def test_remove_retries_on_ebusy(dm: KernelBackend, fake: FakeLib, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "REMOVE_RETRY_DELAY", 0.0)
    busy = [2]

    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        if task.type == TaskType.REMOVE and busy[0]:
            busy[0] -= 1
            return 0, errno.EBUSY, [(3, b"device-mapper: remove ioctl on x-dmtt  failed: Device or resource busy")]
        return 1, 0, []

    fake.on_run = on_run
    dm.remove("x-dmtt", retry=True)
    assert len(fake.of_type(TaskType.REMOVE)) == 3
    busy[0] = 1
    with pytest.raises(DeviceBusy):
        dm.remove("x-dmtt")
    assert len(fake.of_type(TaskType.REMOVE)) == 4


def test_udev_sync_cookie_waited_for(fake: FakeLib) -> None:
    fake.sync = 1
    fake.ready_after = 3
    dm = KernelBackend(libdm=LibDM(fake), udev_sync=True)
    dm.resume("x-dmtt")
    (resume,) = fake.tasks
    assert resume.called("dm_task_set_cookie") == [(0, 0)]
    assert ("dm_udev_set_sync_support", (1,)) in fake.calls
    waits = [args for name, args in fake.calls if name == "dm_udev_wait_immediate"]
    assert waits == [(COOKIE,)] * 3
    assert ("dm_udev_complete", (COOKIE,)) not in fake.calls


def test_udev_cookie_waited_for_also_when_the_task_fails(fake: FakeLib) -> None:
    fake.sync = 1
    fake.on_run = _fail(errno.ENXIO, b"device-mapper: resume ioctl on x-dmtt  failed: No such device or address", (TaskType.RESUME,))
    dm = KernelBackend(libdm=LibDM(fake), udev_sync=True)
    with pytest.raises(DeviceNotFound):
        dm.resume("x-dmtt")
    assert ("dm_udev_wait_immediate", (COOKIE,)) in fake.calls


def test_udev_wait_is_bounded(fake: FakeLib) -> None:
    fake.sync = 1
    fake.ready_after = 10**9
    dm = KernelBackend(libdm=LibDM(fake), udev_sync=True, udev_timeout=0.05)
    dm.rename("x-dmtt", "y-dmtt")
    names = [name for name, _ in fake.calls]
    assert ("dm_udev_complete", (COOKIE,)) in fake.calls
    assert names.index("dm_udev_complete") < len(names) - 1
    assert ("dm_udev_wait", (COOKIE,)) in fake.calls
    (rename,) = fake.tasks
    assert rename.called("dm_task_set_newname") == [(b"y-dmtt",)]


def test_old_libdm_without_wait_immediate_waits_blocking(fake: FakeLib, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.sync = 1

    def missing(*args: Any) -> int:
        raise AssertionError("called a symbol the library lacks")

    libdm = LibDM(fake)
    monkeypatch.setattr(libdm, "supports", lambda fn: fn != "dm_udev_wait_immediate")
    monkeypatch.setattr(fake, "dm_udev_wait_immediate", missing, raising=False)
    KernelBackend(libdm=libdm, udev_sync=True).resume("x-dmtt")
    assert ("dm_udev_wait", (COOKIE,)) in fake.calls
    assert LibDM(fake).supports("dm_task_run") and not LibDM(fake).supports("dm_no_such_function")


def test_no_udev_flushes_node_operations(dm: KernelBackend, fake: FakeLib) -> None:
    dm.resume("x-dmtt")
    assert ("dm_udev_set_sync_support", (0,)) in fake.calls
    assert ("dm_udev_wait", (0,)) in fake.calls  # cookie 0: performs libdm's stacked mknod now
    fake.calls.clear()
    dm.suspend("x-dmtt")
    assert ("dm_task_update_nodes", ()) in fake.calls


def test_info_fields(dm: KernelBackend, fake: FakeLib) -> None:
    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        task.info = dict(exists=1, suspended=1, live_table=1, inactive_table=1, open_count=2, event_nr=9,
                         major=254, minor=7, read_only=1, target_count=3, deferred_remove=1, internal_suspend=0)
        task.name, task.uuid = b"x-dmtt", b"LVM-abc"
        return 1, 0, []

    fake.on_run = on_run
    info = dm.info("x-dmtt")
    assert info == dmtools.DeviceInfo(name="x-dmtt", uuid="LVM-abc", exists=True, suspended=True, live_table=True,
                                      inactive_table=True, open_count=2, event_nr=9, major=254, minor=7, read_only=True,
                                      target_count=3, deferred_remove=True, internal_suspend=False)
    assert info.state == "SUSPENDED"
    assert dm.device_ref("x-dmtt") == "254:7"


def test_info_on_missing_device(dm: KernelBackend, fake: FakeLib) -> None:
    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        task.info = {"exists": 0}  # libdm: ENXIO on INFO only clears "exists"
        return 1, 0, []

    fake.on_run = on_run
    with pytest.raises(DeviceNotFound):
        dm.info("gone-dmtt")
    assert dm.exists("gone-dmtt") is False
    with pytest.raises(DeviceNotFound):
        dm.status("gone-dmtt")


def test_table_and_status(dm: KernelBackend, fake: FakeLib) -> None:
    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        task.info = _info()
        if task.type == TaskType.TABLE:
            task.targets = [(0, 2048, b"linear", b"7:0 0"), (2048, 1024, b"striped", b"2 8 7:1 0 7:2 0")]
        else:
            task.targets = [(0, 2048, b"linear", b""), (2048, 1024, b"striped", b"2 7:1 7:2 1/1 AA")]
        return 1, 0, []

    fake.on_run = on_run
    table = dm.table("x-dmtt", inactive=True)
    assert isinstance(table, Table)
    assert str(table) == "0 2048 linear 7:0 0\n2048 1024 striped 2 8 7:1 0 7:2 0"
    assert fake.tasks[0].called("dm_task_query_inactive_table") == [()]
    status = dm.status("x-dmtt")
    assert [str(s) for s in status] == ["0 2048 linear", "2048 1024 striped 2 7:1 7:2 1/1 AA"]
    assert not fake.tasks[1].called("dm_task_query_inactive_table")


def test_empty_table(dm: KernelBackend, fake: FakeLib) -> None:
    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        task.info = _info(live_table=0, target_count=0)
        return 1, 0, []

    fake.on_run = on_run
    assert len(dm.table("x-dmtt")) == 0
    assert dm.status("x-dmtt") == []


def test_list_targets_deps_version(dm: KernelBackend, fake: FakeLib, monkeypatch: pytest.MonkeyPatch) -> None:
    names = build_names([("a-dmtt", 254 << 8, 4, "UUID-A"), ("b-dmtt", (254 << 8) | 1, 0, None)])
    versions = build_versions([("linear", (1, 4, 0)), ("striped", (1, 6, 0))])
    deps = build_deps([(7 << 8) | 0, (7 << 8) | 1])
    buffers = {TaskType.LIST: names, TaskType.LIST_VERSIONS: versions, TaskType.DEPS: deps}

    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        task.buffer = buffers.get(task.type)
        return 1, 0, []

    fake.on_run = on_run
    monkeypatch.setattr(kernel, "_sysfs_uuid", lambda major, minor: f"sysfs-{major}:{minor}")
    assert dm.list() == [
        dmtools.DeviceEntry("a-dmtt", 254, 0, 4, "UUID-A"),
        dmtools.DeviceEntry("b-dmtt", 254, 1, 0, "sysfs-254:1"),
    ]
    assert dm.targets() == {"linear": (1, 4, 0), "striped": (1, 6, 0)}
    assert dm.deps("x-dmtt") == [(7, 0), (7, 1)]
    v = dm.version()
    assert (v.library, v.driver, v.backend) == ("1.02.185 (fake)", "4.47.0", "kernel")


def test_libdm_log_becomes_exception_text_not_stderr(dm: KernelBackend, fake: FakeLib, capfd: pytest.CaptureFixture[str]) -> None:
    def on_run(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
        return 0, errno.EBUSY, [
            (7, b"dm remove x-dmtt  [ opencount flush ]   [16384] (*1)"),
            (3, b"device-mapper: remove ioctl on x-dmtt  failed: Device or resource busy"),
        ]

    fake.on_run = on_run
    with pytest.raises(DeviceBusy) as exc:
        dm.remove("x-dmtt")
    assert exc.value.message == "device-mapper: remove ioctl on x-dmtt  failed: Device or resource busy"
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_log_hook_falls_back_when_callbacks_are_impossible(fake: FakeLib, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("Cannot allocate write+execute memory for ffi.callback()")

    monkeypatch.setattr(ffimod, "_callback", None)
    monkeypatch.setattr(ffimod, "_new_log_callback", refuse)
    libdm = LibDM(fake)
    assert libdm.install_log_hook(lambda level, text: None) is False
    assert "write+execute" in (libdm.log_hook_error or "")
    assert fake.log_fn is None  # libdm keeps its default logger
    dm = KernelBackend(libdm=libdm, udev_sync=False)
    fake.on_run = _fail(errno.ENXIO, b"unused", (TaskType.SUSPEND,))
    with pytest.raises(DeviceNotFound, match="No such device or address"):
        dm.suspend("x-dmtt")


def test_kernel_reason_prefers_specific_lines_of_the_device() -> None:
    lines = [
        "loop0: detected capacity change from 0 to 32768",
        "device-mapper: table: 254:1: linear: Device lookup failed (-ENODEV)",
        "device-mapper: table: 254:0: linear: Device lookup failed (-ENODEV)",
        "device-mapper: ioctl: error adding target to table",
    ]
    assert kernel_reason(lines, "254:0") == "device-mapper: table: 254:0: linear: Device lookup failed (-ENODEV)"
    log = ["device-mapper: dirty region log: log device 7:3 too small: need 1536 bytes",
           "device-mapper: table: 254:0: mirror: Error creating mirror dirty log (-EINVAL)"]
    assert kernel_reason(log + lines[3:], "254:0") == "; ".join(log)  # why the constructor failed
    assert kernel_reason(lines[3:]) == "device-mapper: ioctl: error adding target to table"
    assert kernel_reason(lines[:1]) == ""


def test_kernel_reason_reaches_invalid_table(dm: KernelBackend, fake: FakeLib, monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeKernelLog:
        def read(self) -> list[str]:
            return ["device-mapper: table: 254:3: striped: Invalid chunk size", "device-mapper: ioctl: error adding target to table"]

        def close(self) -> None:
            pass

    monkeypatch.setattr(kernel, "_KernelLog", FakeKernelLog)
    fake.on_run = _fail(errno.EINVAL, b"device-mapper: reload ioctl on x-dmtt  failed: Invalid argument", (TaskType.RELOAD,))
    with pytest.raises(InvalidTable) as exc:
        dm.load("x-dmtt", "0 8 zero")
    assert type(exc.value) is InvalidTable
    assert exc.value.message.endswith("(kernel: device-mapper: table: 254:3: striped: Invalid chunk size)")


def test_bad_table_refused_before_c(dm: KernelBackend, fake: FakeLib) -> None:
    with pytest.raises(InvalidTable):
        dm.load("x-dmtt", "0 0 linear 7:0 0")
    with pytest.raises(InvalidTable):
        dm.load("x-dmtt", "")
    with pytest.raises(InvalidArgument):
        dm.create("x-dmtt", readonly=True)
    assert fake.tasks == []


def test_device_path_is_mangled_like_libdm(dm: KernelBackend) -> None:
    assert dm.device_path("vg-lv") == "/dev/mapper/vg-lv"
    assert dm.device_path("a b") == "/dev/mapper/a\\x20b"


def test_every_c_call_runs_under_the_global_lock(dm: KernelBackend, fake: FakeLib) -> None:
    fake.check_lock = True
    fake.on_run = lambda task: (1, 0, []) if task.type != TaskType.INFO else _found(task)
    dm.create("x-dmtt", "0 8 zero")
    dm.remove("x-dmtt")
    assert len(fake.lock_free_elsewhere) == 5
    assert not any(fake.lock_free_elsewhere)
    assert _lock_free_in_other_thread()  # and released afterwards


def _found(task: FakeTask) -> tuple[int, int, list[tuple[int, bytes]]]:
    task.info = _info()
    return 1, 0, []


def test_debug_logging(dm: KernelBackend, fake: FakeLib, caplog: pytest.LogCaptureFixture) -> None:
    fake.on_run = lambda task: (1, 0, [(7, b"dm suspend x-dmtt  [ noopencount flush ]   [2048] (*1)")])
    with caplog.at_level(logging.DEBUG, logger="dmtools.kernel"):
        dm.suspend("x-dmtt")
    records = [(r.name, r.getMessage()) for r in caplog.records]
    assert ("dmtools.kernel.libdm", "7 dm suspend x-dmtt  [ noopencount flush ]   [2048] (*1)") in records
    assert any(n == "dmtools.kernel" and m.startswith("suspend x-dmtt: ok in ") for n, m in records)


def test_log_hook_is_removed_again(fake: FakeLib) -> None:
    libdm = LibDM(fake)
    assert libdm.install_log_hook(lambda level, text: None)
    assert fake.log_fn is not None and libdm.log_hooked
    libdm.uninstall_log_hook()  # what atexit runs before libdm's destructor can log
    assert fake.log_fn == ffi.NULL and not libdm.log_hooked


def test_close_releases_library(dm: KernelBackend, fake: FakeLib) -> None:
    dm.close()
    assert ("dm_lib_release", ()) in fake.calls


# ---------------------------------------------------------------------------------------------
# no device-mapper: checked before libdm is loaded


def test_missing_control_node_is_kernel_unavailable_without_libdm(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[int] = []
    monkeypatch.setattr(ffimod, "open_library", lambda: loads.append(1))
    missing = str(tmp_path / "control")
    with pytest.raises(KernelUnavailable) as exc:
        KernelBackend(control_path=missing)
    assert missing in str(exc.value) and exc.value.errno == errno.ENOENT
    regular = tmp_path / "regular"
    regular.write_bytes(b"")
    with pytest.raises(KernelUnavailable, match="not a character device"):
        KernelBackend(control_path=str(regular))
    assert loads == []


def test_open_kernel_on_this_host_never_asks_libdm() -> None:
    if os.path.exists("/dev/mapper/control"):
        pytest.skip("this host has /dev/mapper/control; the no-device-mapper case needs a host without it")
    # A fresh interpreter: libdevmapper must not even be mapped, dm_task_create never called,
    # and nothing printed on stderr.
    code = textwrap.dedent(
        """
        import dmtools, dmtools._ffi as f
        def trap():
            raise AssertionError("libdevmapper loaded")
        f.open_library = trap
        try:
            dmtools.open("kernel")
        except dmtools.KernelUnavailable as e:
            print("ERR", e)
        print("MAPPED", "libdevmapper" in open("/proc/self/maps").read())
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "ERR open: /dev/mapper/control does not exist" in proc.stdout
    assert "MAPPED False" in proc.stdout


def test_real_library_log_hook_gets_formatted_text() -> None:
    """The legacy dm_log_init hook receives libdm's own formatted text as the fifth argument."""
    from cffi import FFI

    lib = ffimod.open_library()  # loading runs libdm's constructor only; no driver access
    dm = LibDM(lib)
    got: list[tuple[int, str]] = []
    assert dm.install_log_hook(lambda level, text: got.append((level, text)))
    try:
        # Call libdm's internal log entry point, which every log_error() goes through.
        probe = FFI()
        probe.cdef(
            "extern void (*dm_log_with_errno)(int level, const char *file, int line, int dm_errno_or_class,"
            " const char *f, ...);"
        )
        plib = None
        for name in ffimod._library_names():
            try:
                plib = probe.dlopen(name)
                break
            except OSError:
                continue
        assert plib is not None
        plib.dm_log_with_errno(3, b"x.c", 1, -1, b"%s %d", probe.new("char[]", b"hello"), probe.cast("int", 42))
        assert got == [(3, "hello 42")]
        assert LibDM(lib).library_version().startswith("1.02.")
    finally:
        dm.install_log_hook(kernel._log_sink)
