"""Kernel tier: the kernel backend on real device-mapper (run in the VM: ``scripts/vmtest``).

Devices sit on loop devices over sparse images. Where the real ``dmsetup`` is the reference, it is
run as a subprocess on the same device and its output compared with ours.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dmtools.blockdev import BlockDevice, aligned_buffer
from dmtools.errors import DeviceBusy, DeviceExists, DeviceNotFound, InvalidArgument, InvalidTable, TargetNotSupported
from dmtools.kernel import KernelBackend
from dmtools.table import Table, format_line
from dmtools.testing.threads import run_together
from dmtools.testing.wait import wait_until

pytestmark = pytest.mark.kernel

MiB = 1 << 20


def dmsetup(*args: str) -> str:
    """Run the real dmsetup; its stdout."""
    proc = subprocess.run(["dmsetup", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"dmsetup {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def dmsetup_info(name: str) -> dict[str, str]:
    out = {}
    for line in dmsetup("info", name).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def read_direct(path: str, offset: int, length: int) -> bytes:
    """Read bypassing the page cache, so what is read is what reached the device."""
    buf = aligned_buffer(length)
    with BlockDevice(path, direct=True) as dev:
        assert dev.readinto(buf, offset) == length
    return bytes(buf)


def write_through(path: str, offset: int, data: bytes) -> None:
    with BlockDevice(path, writable=True) as dev:
        assert dev.write(data, offset) == len(data)
        dev.flush()


def pattern(tag: int, length: int) -> bytes:
    return bytes((tag + i * 7) & 0xFF for i in range(length))


@pytest.fixture
def loops(make_image: Callable[..., Any], make_loop: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: a loop device over a new sparse image of ``size`` bytes (4 MiB by default)."""

    def new(size: int = 4 * MiB) -> Any:
        return make_loop(make_image(size))

    return new


@pytest.fixture
def names(kernel_dm: KernelBackend, dm_name: str, loops: Any) -> Iterator[Callable[[str], str]]:
    """Factory of unique device names; every device still there is removed at teardown
    (before the loop devices under it are detached)."""
    made: list[str] = []

    def new(tag: str = "") -> str:
        name = dm_name[: -len("-dmtt")] + tag + "-dmtt"
        made.append(name)
        return name

    yield new
    for name in reversed(made):
        if kernel_dm.exists(name):
            kernel_dm.remove(name, retry=True)


def test_linear_create_reload_suspend_resume_rename_remove(kernel_dm: KernelBackend, loops: Any, names: Any) -> None:
    a, b = loops(), loops()
    name, renamed = names("lin"), names("ren")
    info = kernel_dm.create(name, f"0 2048 linear {a.path} 0", uuid=f"DMTT-{name}")
    assert info.live_table and not info.suspended and info.target_count == 1
    assert info.uuid == f"DMTT-{name}"
    path = kernel_dm.device_path(name)
    assert stat.S_ISBLK(os.stat(path).st_mode)
    assert kernel_dm.device_ref(name) == f"{info.major}:{info.minor}"
    assert kernel_dm.deps(name) == [(a.major, a.minor)]
    with kernel_dm.open_endpoint(name, writable=False) as endpoint:
        assert endpoint.size == 2048 * 512 and endpoint.read_only

    data = pattern(1, 8192)
    write_through(path, 4096, data)
    assert read_direct(a.path, 4096, 8192) == data

    # Reload onto the second loop device at an offset: inactive until resumed.
    kernel_dm.load(name, f"0 2048 linear {b.path} 8")
    info = kernel_dm.info(name)
    assert info.live_table and info.inactive_table
    assert str(kernel_dm.table(name, inactive=True)) == f"0 2048 linear {b.major}:{b.minor} 8"
    assert str(kernel_dm.table(name)) == f"0 2048 linear {a.major}:{a.minor} 0"
    kernel_dm.suspend(name)
    assert kernel_dm.info(name).suspended
    kernel_dm.resume(name)
    info = kernel_dm.info(name)
    assert not info.suspended and not info.inactive_table
    assert str(kernel_dm.table(name)) == f"0 2048 linear {b.major}:{b.minor} 8"
    data2 = pattern(2, 4096)
    write_through(path, 0, data2)
    assert read_direct(b.path, 8 * 512, 4096) == data2

    kernel_dm.rename(name, renamed)
    assert not kernel_dm.exists(name)
    assert kernel_dm.info(renamed).uuid == f"DMTT-{name}"
    assert os.path.exists(kernel_dm.device_path(renamed))
    wait_until(lambda: not os.path.exists(path), f"{path} to go after the rename")
    assert read_direct(kernel_dm.device_path(renamed), 0, 4096) == data2

    kernel_dm.remove(renamed)
    assert renamed not in [e.name for e in kernel_dm.list()]
    wait_until(lambda: not os.path.exists(kernel_dm.device_path(renamed)), "the device node to go")
    with pytest.raises(DeviceNotFound):
        kernel_dm.info(renamed)


def test_striped_places_chunks_round_robin(kernel_dm: KernelBackend, loops: Any, names: Any) -> None:
    a, b = loops(), loops()
    name = names("str")
    # 2 stripes of 8-sector (4 KiB) chunks, 64 sectors in all.
    kernel_dm.create(name, f"0 64 striped 2 8 {a.path} 0 {b.path} 16")
    chunks = [pattern(10 + i, 4096) for i in range(8)]
    write_through(kernel_dm.device_path(name), 0, b"".join(chunks))
    for i, chunk in enumerate(chunks):
        dev, base = (a, 0) if i % 2 == 0 else (b, 16 * 512)
        assert read_direct(dev.path, base + (i // 2) * 4096, 4096) == chunk
    assert str(kernel_dm.table(name)) == f"0 64 striped 2 8 {a.major}:{a.minor} 0 {b.major}:{b.minor} 16"
    assert sorted(kernel_dm.deps(name)) == sorted([(a.major, a.minor), (b.major, b.minor)])


def test_zero_and_error_targets(kernel_dm: KernelBackend, names: Any) -> None:
    name = names("ze")
    kernel_dm.create(name, "0 8 zero\n8 8 error")
    path = kernel_dm.device_path(name)
    assert read_direct(path, 0, 4096) == bytes(4096)
    with pytest.raises(Exception) as exc:  # noqa: PT011 - the endpoint's error type wraps EIO
        read_direct(path, 4096, 4096)
    assert getattr(exc.value, "errno", None) == errno.EIO
    # Writes to zero are accepted and dropped.
    write_through(path, 0, pattern(3, 4096))
    assert read_direct(path, 0, 4096) == bytes(4096)
    assert [str(s) for s in kernel_dm.status(name)] == ["0 8 zero", "8 8 error"]

    # Reload as error over all of it; then clear a loaded table again.
    kernel_dm.load(name, "0 16 error")
    kernel_dm.clear(name)
    assert not kernel_dm.info(name).inactive_table
    assert str(kernel_dm.table(name)) == "0 8 zero\n8 8 error"


def test_table_status_info_equal_dmsetup(kernel_dm: KernelBackend, loops: Any, names: Any) -> None:
    a, b = loops(), loops()
    name = names("cmp")
    kernel_dm.create(name, f"0 1024 linear {a.path} 0\n1024 64 striped 2 8 {a.path} 2048 {b.path} 0\n1088 8 zero",
                     uuid=f"DMTT-cmp-{name}")
    kernel_dm.load(name, "0 16 error")
    assert kernel_dm.table(name).dmsetup_text() == dmsetup("table", name)
    assert kernel_dm.table(name, inactive=True).dmsetup_text() == dmsetup("table", "--inactive", name)
    ours = "".join(format_line(s.start, s.length, s.target_type, s.params) for s in kernel_dm.status(name))
    assert ours == dmsetup("status", name)
    # Parsing dmsetup's text gives the same value as ours.
    assert Table.parse(dmsetup("table", name)) == kernel_dm.table(name)

    fd = os.open(kernel_dm.device_path(name), os.O_RDONLY)
    try:
        kernel_dm.suspend(name)
        info = kernel_dm.info(name)
        theirs = dmsetup_info(name)
    finally:
        kernel_dm.resume(name)
        os.close(fd)
    tables = " & ".join(t for t, on in (("LIVE", info.live_table), ("INACTIVE", info.inactive_table)) if on)
    assert theirs["Name"] == info.name
    assert theirs["State"] == info.state == "SUSPENDED"
    assert theirs["Tables present"] == (tables or "None")
    assert theirs["Open count"] == str(info.open_count) == "1"
    assert theirs["Event number"] == str(info.event_nr)
    assert theirs["Major, minor"] == f"{info.major}, {info.minor}"
    assert theirs["Number of targets"] == str(info.target_count) == "3"
    assert theirs["UUID"] == info.uuid


def test_dmsetup_and_we_see_each_others_devices(kernel_dm: KernelBackend, loops: Any, names: Any) -> None:
    a = loops()
    theirs, ours = names("th"), names("our")
    dmsetup("create", theirs, "--uuid", f"DMTT-{theirs}", "--table", f"0 512 linear {a.path} 0")
    entries = {e.name: e for e in kernel_dm.list()}
    assert entries[theirs].uuid == f"DMTT-{theirs}"
    info = kernel_dm.info(theirs)
    assert (entries[theirs].major, entries[theirs].minor) == (info.major, info.minor)
    assert str(kernel_dm.table(theirs)) == f"0 512 linear {a.major}:{a.minor} 0"

    # Stack ours on theirs, referenced by major:minor.
    kernel_dm.create(ours, f"0 512 linear {kernel_dm.device_ref(theirs)} 0", uuid=f"DMTT-{ours}")
    ls = dmsetup("ls")
    mine = kernel_dm.info(ours)
    assert f"{ours}\t({mine.major}:{mine.minor})" in ls or f"{ours}\t({mine.major}, {mine.minor})" in ls
    assert dmsetup_info(ours)["UUID"] == f"DMTT-{ours}"
    assert dmsetup("deps", ours).strip().endswith(f"({info.major}, {info.minor})")
    assert kernel_dm.deps(ours) == [(info.major, info.minor)]

    with pytest.raises(DeviceExists):
        kernel_dm.rename(ours, theirs)
    with pytest.raises(DeviceExists):
        kernel_dm.create(names("dupuuid"), "0 8 zero", uuid=f"DMTT-{theirs}")

    kernel_dm.remove(ours)
    dmsetup("remove", theirs)
    assert not kernel_dm.exists(theirs)


def test_invalid_table_carries_the_kernels_reason(kernel_dm: KernelBackend, loops: Any, names: Any) -> None:
    a = loops()
    name, bad = names("inv"), names("bad")
    kernel_dm.create(name, f"0 64 linear {a.path} 0")

    with pytest.raises(InvalidTable) as exc:
        kernel_dm.load(name, "0 64 linear /dev/dmtt-no-such-device 0")
    assert "Device lookup failed" in str(exc.value)
    assert exc.value.operation == "load" and exc.value.device == name
    info = kernel_dm.info(name)
    assert not info.inactive_table and str(kernel_dm.table(name)) == f"0 64 linear {a.major}:{a.minor} 0"

    with pytest.raises(TargetNotSupported, match="unknown target type"):
        kernel_dm.load(name, "0 64 dmtt-nonesuch 1 2 3")

    # Beyond the end of the loop device: refused by the kernel, and create is rolled back.
    with pytest.raises(InvalidTable, match="too small for target"):
        kernel_dm.create(bad, f"0 64 linear {a.path} 99999999")
    assert not kernel_dm.exists(bad)

    with pytest.raises(DeviceExists):
        kernel_dm.create(name)
    with pytest.raises(DeviceNotFound):
        kernel_dm.load(names("ghost"), "0 8 zero")


def test_removing_an_open_device_is_busy(kernel_dm: KernelBackend, names: Any) -> None:
    name = names("busy")
    kernel_dm.create(name, "0 8 zero")
    fd = os.open(kernel_dm.device_path(name), os.O_RDONLY)
    try:
        with pytest.raises(DeviceBusy) as exc:
            kernel_dm.remove(name)
        assert exc.value.errno == errno.EBUSY
        assert kernel_dm.exists(name)
        # Deferred: accepted while open, done at the last close.
        kernel_dm.remove(name, deferred=True)
        assert kernel_dm.info(name).deferred_remove
    finally:
        os.close(fd)
    wait_until(lambda: not kernel_dm.exists(name), "the deferred remove")


def test_a_kernel_table_over_an_exposed_engine_device_is_one_opener(exposed_engine: Any, kernel_dm: KernelBackend,
                                                                     names: Any, loops: Any) -> None:
    """A kernel dm table over an engine's exposed device holds it as it holds a kernel dm device
    under another table: one open, no descriptor, a ``holders/`` link in sysfs; the engine counts
    it from that link (``dmtools.engine.openers``) as the kernel counts its own."""
    lo, klo = loops(), loops()
    low, top = names("low"), names("top")
    exposed_engine.create(low, f"0 8192 linear {lo.path} 0")
    path = exposed_engine.device_path(low)
    kernel_dm.create(top, f"0 4096 linear {path} 0")
    try:
        holders = os.listdir(f"/sys/block/{os.path.basename(os.path.realpath(path))}/holders")
        assert len(holders) == 1 and holders[0].startswith("dm-")
        assert exposed_engine.info(low).open_count == 1
    finally:
        kernel_dm.remove(top)
    assert exposed_engine.info(low).open_count == 0
    klow, ktop = names("klow"), names("ktop")
    kernel_dm.create(klow, f"0 8192 linear {klo.path} 0")
    kernel_dm.create(ktop, f"0 4096 linear {kernel_dm.device_path(klow)} 0")
    assert kernel_dm.info(klow).open_count == 1
    kernel_dm.remove(ktop)
    assert kernel_dm.info(klow).open_count == 0
    exposed_engine.remove(low)


def test_targets_version_and_messages(kernel_dm: KernelBackend, names: Any) -> None:
    targets = kernel_dm.targets()
    for t in ("linear", "striped", "error"):
        assert len(targets[t]) == 3 and all(isinstance(v, int) for v in targets[t])
    assert targets["linear"][0] >= 1
    v = kernel_dm.version()
    assert v.driver.startswith("4.") and v.library.startswith("1.02.")
    assert v.driver.split(".")[:2] == dmsetup("version").split("Driver version:")[1].split()[0].split(".")[:2]

    name = names("msg")
    kernel_dm.create(name, "0 8 zero")
    with pytest.raises(InvalidArgument, match="does not support messages"):
        kernel_dm.message(name, 0, "hello")


def test_readonly_and_noflush_suspend(kernel_dm: KernelBackend, loops: Any, names: Any) -> None:
    a = loops()
    name = names("ro")
    info = kernel_dm.create(name, f"0 64 linear {a.path} 0", readonly=True)
    assert info.read_only
    assert dmsetup_info(name)["State"] == "ACTIVE (READ-ONLY)"
    # The block layer refuses writes to a read-only disk (block/fops.c blkdev_write_iter).
    fd = os.open(kernel_dm.device_path(name), os.O_WRONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.write(fd, bytes(512))
        assert exc.value.errno == errno.EPERM
    finally:
        os.close(fd)
    kernel_dm.suspend(name, noflush=True)
    assert kernel_dm.info(name).suspended
    kernel_dm.resume(name)
    assert not kernel_dm.info(name).suspended


def test_wait_event_follows_a_rename(kernel_dm: KernelBackend, names: Any) -> None:
    from dmtools.linux import CONTROL_PATH
    from dmtools.kernel import _EventPoll

    poll = _EventPoll(CONTROL_PATH)  # DM_DEV_ARM_POLL works here, so waits block in poll()
    try:
        poll.arm()
    finally:
        poll.close()
    name, other = names("ev"), names("ev2")
    kernel_dm.create(name, "0 8 zero")
    start = kernel_dm.info(name).event_nr
    began = time.monotonic()
    assert kernel_dm.wait_event(name, start, timeout=0.3) == start
    assert time.monotonic() - began >= 0.25
    result: dict[str, Any] = {}
    waiting = threading.Event()

    def waiter() -> None:
        waiting.set()
        try:
            result["event"] = kernel_dm.wait_event(name, start, timeout=30)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            result["error"] = err

    thread = threading.Thread(target=waiter)
    thread.start()
    assert waiting.wait(10)
    kernel_dm.rename(name, other)  # dm-ioctl.c dm_hash_rename raises a table event
    thread.join(30)
    assert not thread.is_alive()
    assert result.get("event") == kernel_dm.info(other).event_nr != start, result
    listed = {e.name: e for e in kernel_dm.list()}
    assert listed[other].event_nr == result["event"]  # dm-ioctl >= 4.37 reports it in the list


def test_without_udev_sync_nodes_still_appear(names: Any) -> None:
    dm = KernelBackend(udev_sync=False)
    name = names("nosync")
    dm.create(name, "0 8 zero")
    path = dm.device_path(name)
    assert stat.S_ISBLK(os.stat(path).st_mode)
    assert read_direct(path, 0, 4096) == bytes(4096)
    dm.remove(name, retry=True)
    assert not os.path.exists(path)


def test_message_with_a_response_and_cancelled_deferred_remove(kernel_dm: KernelBackend, names: Any) -> None:
    name = names("stats")
    kernel_dm.create(name, "0 8 zero")
    # dm-stats messages are answered by dm-ioctl itself (drivers/md/dm-stats.c).
    region = kernel_dm.message(name, 0, "@stats_create - /1")
    assert region == "0"
    listing = kernel_dm.message(name, 0, "@stats_list")
    assert listing is not None and listing.startswith("0: 0+8 8")
    assert kernel_dm.message(name, 0, "@stats_delete 0") is None

    fd = os.open(kernel_dm.device_path(name), os.O_RDONLY)
    try:
        kernel_dm.remove(name, deferred=True)
        assert kernel_dm.info(name).deferred_remove
        kernel_dm.message(name, 0, "@cancel_deferred_remove")
        assert not kernel_dm.info(name).deferred_remove
    finally:
        os.close(fd)
    assert kernel_dm.exists(name)


def test_threads_share_one_backend(kernel_dm: KernelBackend, names: Any) -> None:
    workers = [[names(f"th{w}i{i}") for i in range(3)] for w in range(4)]

    def work(batch: list[str]) -> None:
        for name in batch:
            kernel_dm.create(name, "0 16 zero")
            assert str(kernel_dm.table(name)) == "0 16 zero"
            kernel_dm.remove(name, retry=True)

    run_together([functools.partial(work, batch) for batch in workers], timeout=120)
    listed = {e.name for e in kernel_dm.list()}
    assert not listed & {n for batch in workers for n in batch}
