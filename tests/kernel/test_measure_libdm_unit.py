"""``KernelBackend.measure`` over a fake libdevmapper (unit tier): the calls made, and the clear
errors for a libdm without ``dm_task_ima_measurement`` or a driver older than dm-ioctl 4.45."""

from __future__ import annotations

from typing import Any

import pytest

from dmtools._ffi import LibDM, TaskType, ffi
from dmtools.backend import StatusLine
from dmtools.errors import DeviceNotFound, TargetNotSupported
from dmtools.kernel import KernelBackend


class FakeLib:
    """The libdm functions a STATUS task uses; ``ima`` False hides ``dm_task_ima_measurement``."""

    def __init__(self, *, ima: bool = True, driver: bytes = b"4.47.0", exists: int = 1) -> None:
        self.ima = ima
        self.driver = driver
        self.exists = exists
        self.calls: list[str] = []
        self.types: list[int] = []
        self._keep: list[Any] = []
        self.targets = [(0, 8, b"linear", b"target_name=linear,target_version=1.4.0,device_name=7:0,start=0;"),
                        (8, 8, b"zero", b"")]

    def __getattr__(self, fn: str) -> Any:
        if fn == "dm_task_ima_measurement" and not self.ima:
            raise AttributeError(fn)  # what cffi raises for a symbol the library lacks
        if fn in ("dm_task_set_name", "dm_task_ima_measurement", "dm_task_query_inactive_table"):
            def setter(ptr: Any, *args: Any) -> int:
                self.calls.append(fn)
                return 1
            return setter
        raise AttributeError(fn)

    def dm_log_init(self, fn: Any) -> None:
        return None

    def dm_task_create(self, task_type: int) -> Any:
        self.types.append(task_type)
        keep = ffi.new("char[8]")
        self._keep.append(keep)
        return ffi.cast("struct dm_task *", keep)

    def dm_task_destroy(self, ptr: Any) -> None:
        return None

    def dm_task_run(self, ptr: Any) -> int:
        self.calls.append("dm_task_run")
        return 1

    def dm_task_get_errno(self, ptr: Any) -> int:
        return 0

    def dm_task_get_info(self, ptr: Any, dmi: Any) -> int:
        dmi.exists = self.exists
        return 1

    def dm_task_get_driver_version(self, ptr: Any, buf: Any, size: int) -> int:
        ffi.memmove(buf, self.driver + b"\0", len(self.driver) + 1)
        return 1

    def dm_get_library_version(self, buf: Any, size: int) -> int:
        ffi.memmove(buf, b"1.02.175\0", 9)
        return 1

    def dm_get_next_target(self, ptr: Any, nxt: Any, start: Any, length: Any, ttype: Any, params: Any) -> Any:
        # libdm's iterator: ``nxt`` is NULL first, then what the previous call returned
        position = int(ffi.cast("uintptr_t", nxt))
        first, count, type_name, text = self.targets[position]
        strings = [ffi.new("char[]", type_name), ffi.new("char[]", text)]
        self._keep.extend(strings)
        start[0], length[0], ttype[0], params[0] = first, count, strings[0], strings[1]
        more = position + 1 < len(self.targets)
        return ffi.cast("void *", position + 1) if more else ffi.NULL

    def dm_udev_set_sync_support(self, value: int) -> None:
        return None

    def dm_task_update_nodes(self) -> None:
        return None


def _backend(lib: FakeLib) -> KernelBackend:
    return KernelBackend(libdm=LibDM(lib), udev_sync=False)


def test_measure_is_a_status_task_with_the_ima_flag() -> None:
    lib = FakeLib()
    lines = _backend(lib).measure("d", inactive=True)
    assert lines == [StatusLine(0, 8, "linear",
                                "target_name=linear,target_version=1.4.0,device_name=7:0,start=0;"),
                     StatusLine(8, 8, "zero", "")]
    assert lib.types == [TaskType.STATUS]
    assert lib.calls == ["dm_task_set_name", "dm_task_query_inactive_table", "dm_task_ima_measurement", "dm_task_run"]


def test_libdm_without_the_symbol_is_target_not_supported_before_any_ioctl() -> None:
    lib = FakeLib(ima=False)
    with pytest.raises(TargetNotSupported, match=r"1\.02\.175 has no dm_task_ima_measurement"):
        _backend(lib).measure("d")
    assert "dm_task_run" not in lib.calls


def test_driver_before_4_45_is_target_not_supported() -> None:
    """An old driver ignores the flag and would answer with STATUSTYPE_INFO text: refused."""
    with pytest.raises(TargetNotSupported, match=r"4\.44\.0 cannot report IMA"):
        _backend(FakeLib(driver=b"4.44.0")).measure("d")


def test_missing_device() -> None:
    with pytest.raises(DeviceNotFound):
        _backend(FakeLib(exists=0)).measure("d")
