"""Kernel tier: the kernel's dm-mirror and our log format, resync and manager (run: scripts/vmtest).

Legs and logs are loop devices over sparse images; leg failures go through device-mapper
``linear`` devices reloaded with the ``error`` target.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import pytest

from dmtools.blockdev import BlockDevice, aligned_buffer
from mirror.format import LogImage, format_log, inspect
from mirror.manager import MirrorManager

pytestmark = pytest.mark.kernel

MiB = 1 << 20
SIZE = 8 * MiB
SECTORS = SIZE // 512
REGION = 128  # 64 KiB -> 128 regions


def _loops(make_image: Callable[..., Any], make_loop: Callable[..., Any], n: int, size: int = SIZE,
           data: bytes | None = None) -> list[str]:
    out = []
    for i in range(n):
        img = make_image(size)
        if data is not None and i == 0:
            with open(img, "r+b") as f:
                f.write(data)
        out.append(make_loop(img).path)
    return out


def _read(path: str) -> bytes:
    """The device's contents as they reached it (O_DIRECT: the kernel's mirror writes bypass the
    legs' page cache, which udev probing may have filled)."""
    with BlockDevice(path, direct=True) as dev:
        buf = aligned_buffer(dev.size)
        assert dev.readinto(buf, 0) == dev.size
        return bytes(buf)


def _write(path: str, offset: int, data: bytes) -> None:
    with BlockDevice(path, writable=True) as dev:
        dev.write(data, offset)
        dev.flush()


def _wait_in_sync(mm: MirrorManager, name: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        st = mm.status(name)
        if st.fully_in_sync or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def test_kernel_log_read_by_inspect_and_by_our_resync(kernel_dm: Any, make_image: Any, make_loop: Any,
                                                      dm_name: str) -> None:
    data = os.urandom(SIZE)
    leg0, leg1, logdev = _loops(make_image, make_loop, 3, data=data)
    mm = MirrorManager(kernel_dm)
    l1 = f"{dm_name[:-5]}-l1-dmtt"
    kernel_dm.create(l1, f"0 {SECTORS} linear {leg1} 0")
    try:
        with BlockDevice(logdev, writable=True) as ep:
            format_log(ep, SECTORS // REGION, in_sync=False)
        mm.create(dm_name, [leg0, kernel_dm.device_path(l1)], log=logdev, region_size=REGION,
                  handle_errors=True, keep_log=True)
        st = _wait_in_sync(mm, dm_name)
        assert st.fully_in_sync and st.health == "AA"
        # fail leg 1 and write regions 3 and 70: the kernel leaves them dirty on its log
        kernel_dm.load(l1, f"0 {SECTORS} error")
        kernel_dm.resume(l1)
        dev = kernel_dm.device_path(dm_name)
        _write(dev, 3 * 65536, b"k" * 4096)
        _write(dev, 70 * 65536 + 512, b"m" * 512)
        assert mm.status(dm_name).health == "AD"
        mm.remove(dm_name)
        kernel_dm.load(l1, f"0 {SECTORS} linear {leg1} 0")
        kernel_dm.resume(l1)
    finally:
        kernel_dm.remove(l1, retry=True)
    rep = inspect(logdev, region_size=REGION)
    assert rep.magic == 0x4D695272 and rep.version == 2 and rep.nr_regions == SECTORS // REGION
    assert set(rep.out_of_sync) == {3, 70}
    res = mm.resync_offline([leg0, leg1], logdev, region_size=REGION)
    assert res.regions_copied == 2
    assert _read(leg0) == _read(leg1)
    st = mm.activate(dm_name, [leg0, leg1], log=logdev, region_size=REGION)
    assert st.fully_in_sync
    mm.remove(dm_name)


def test_offline_resync_then_kernel_reports_in_sync_at_once(kernel_dm: Any, make_image: Any, make_loop: Any,
                                                            dm_name: str) -> None:
    leg0, leg1, logdev = _loops(make_image, make_loop, 3, data=os.urandom(SIZE))
    mm = MirrorManager(kernel_dm)
    with BlockDevice(logdev, writable=True) as ep:
        format_log(ep, SECTORS // REGION, in_sync=False)
    res = mm.resync_offline([leg0, leg1], logdev, region_size=REGION)
    assert res.regions_copied == SECTORS // REGION
    st = mm.activate(dm_name, [leg0, leg1], log=logdev, region_size=REGION)
    try:
        assert st.status_text.split()[3] == f"{SECTORS // REGION}/{SECTORS // REGION}"
        assert st.fully_in_sync and st.health == "AA"
        assert _read(leg0) == _read(leg1)
    finally:
        mm.remove(dm_name)
    assert LogImage.read(BlockDevice(logdev)).out_of_sync() == []


def test_manager_on_kernel_creates_follows_resync_and_removes(kernel_dm: Any, make_image: Any, make_loop: Any,
                                                              dm_name: str) -> None:
    leg0, leg1 = _loops(make_image, make_loop, 2, data=os.urandom(SIZE))
    mm = MirrorManager(kernel_dm)
    mm.create(dm_name, [leg0, leg1], region_size=REGION)
    try:
        seen: list[tuple[int, int]] = []
        st = mm.resync(dm_name, progress=lambda d, t: seen.append((d, t)), timeout=120)
        assert st.fully_in_sync and seen[-1] == (SIZE, SIZE)
        d0, d1 = (f"{os.major(os.stat(p).st_rdev)}:{os.minor(os.stat(p).st_rdev)}" for p in (leg0, leg1))
        assert st.status_text == f"2 {d0} {d1} 128/128 1 AA 1 core"
        assert st.table_text == f"core 1 {REGION} 2 {d0} 0 {d1} 0 1 handle_errors"  # the default
        assert _read(leg0) == _read(leg1)
    finally:
        mm.remove(dm_name)
    assert not kernel_dm.exists(dm_name)


def test_leg_failed_through_error_target_shows_kernel_health_letter(kernel_dm: Any, make_image: Any,
                                                                   make_loop: Any, dm_name: str) -> None:
    leg0, leg1 = _loops(make_image, make_loop, 2)
    mm = MirrorManager(kernel_dm)
    l1 = f"{dm_name[:-5]}-l1-dmtt"
    kernel_dm.create(l1, f"0 {SECTORS} linear {leg1} 0")
    try:
        # handle_errors + keep_log: the failed regions stay out of sync, so the letter stays
        # (without handle_errors a failed recovery counts as in sync and resets the letters)
        mm.create(dm_name, [leg0, kernel_dm.device_path(l1)], region_size=REGION, nosync=True,
                  handle_errors=True, keep_log=True)
        kernel_dm.load(l1, f"0 {SECTORS} error")
        kernel_dm.resume(l1)
        _write(kernel_dm.device_path(dm_name), 0, b"x" * 4096)
        st = mm.status(dm_name)
        assert st.health == "AD"
        assert st.status_text.split()[5] == "AD"
        mm.remove(dm_name)
    finally:
        kernel_dm.remove(l1, retry=True)


def test_log_written_by_the_userspace_target_is_trusted_by_the_kernel(kernel_dm: Any, make_image: Any,
                                                                      make_loop: Any, dm_name: str) -> None:
    from dmtools.engine import Engine

    leg0, leg1, logdev = _loops(make_image, make_loop, 3)
    eng = Engine()
    try:
        um = MirrorManager(eng)
        um.create("umirror", [leg0, leg1], log=logdev, region_size=REGION)  # every region out of sync
        assert um.resync("umirror", timeout=120).fully_in_sync
        with eng.open_endpoint("umirror") as ep:
            ep.write(b"u" * 65536, 5 * 65536)
            ep.flush()
        um.remove("umirror")  # suspend: clean marks written
    finally:
        eng.close()
    assert inspect(logdev).fully_in_sync
    mm = MirrorManager(kernel_dm)
    st = mm.activate(dm_name, [leg0, leg1], log=logdev, region_size=REGION)
    try:
        assert st.fully_in_sync and st.health == "AA"
        assert _read(leg0) == _read(leg1)
        assert _read(kernel_dm.device_path(dm_name))[5 * 65536 : 6 * 65536] == b"u" * 65536
    finally:
        mm.remove(dm_name)


def test_kernel_repair_and_split(kernel_dm: Any, make_image: Any, make_loop: Any, dm_name: str) -> None:
    leg0, leg1, leg2, logdev = _loops(make_image, make_loop, 4, data=os.urandom(SIZE))
    mm = MirrorManager(kernel_dm)
    l1 = f"{dm_name[:-5]}-l1-dmtt"
    split = f"{dm_name[:-5]}-sp-dmtt"
    kernel_dm.create(l1, f"0 {SECTORS} linear {leg1} 0")
    try:
        mm.create(dm_name, [leg0, kernel_dm.device_path(l1)], log=logdev, region_size=REGION,
                  handle_errors=True, keep_log=True)
        assert _wait_in_sync(mm, dm_name).fully_in_sync
        kernel_dm.load(l1, f"0 {SECTORS} error")
        kernel_dm.resume(l1)
        _write(kernel_dm.device_path(dm_name), 0, b"r" * 65536)
        assert mm.status(dm_name).health == "AD"
        st = mm.repair(dm_name, 1, leg2)
        assert st.fully_in_sync and st.health == "AA"
        assert " sync " not in f" {st.table_text} "  # the forced full resync is not left in the table
        assert _read(leg0) == _read(leg2)
        assert mm.split(dm_name, 1, split) == split
        assert kernel_dm.table(dm_name).lines[0].target_type == "linear"
        assert _read(kernel_dm.device_path(split)) == _read(leg0)
    finally:
        for name in (split, dm_name, l1):
            if kernel_dm.exists(name):
                kernel_dm.remove(name, retry=True)


def test_userspace_status_and_table_text_identical_to_the_kernels(kernel_dm: Any, make_image: Any,
                                                                  make_loop: Any, dm_name: str) -> None:
    from dmtools.engine import Engine

    legs = _loops(make_image, make_loop, 3, data=os.urandom(SIZE))
    logdev = _loops(make_image, make_loop, 1, size=MiB)[0]
    texts = []
    for dm in ("kernel", "userspace"):
        eng = kernel_dm if dm == "kernel" else Engine()
        name = dm_name if dm == "kernel" else "utext"
        try:
            mm = MirrorManager(eng)
            mm.create(name, legs, log=logdev, region_size=REGION, handle_errors=True, keep_log=True)
            st = _wait_in_sync(mm, name)
            assert st.fully_in_sync
            texts.append((st.status_text, st.table_text))
            mm.remove(name)
        finally:
            if dm == "userspace":
                eng.close()
    assert texts[0] == texts[1]
    assert texts[0][0].startswith("3 ") and texts[0][0].endswith(" 128/128 1 AAA 3 disk " + texts[0][0].split()[-2] + " A")


def test_what_only_the_constructor_sees_is_refused_in_the_kernels_words(kernel_dm: Any, make_image: Any,
                                                                          make_loop: Any, dm_name: str) -> None:
    """A log type the engine lacks and a log device too small pass the table grammar; the kernel and
    the userspace engine refuse them alike: dm-raid1.c's ``ti->error`` with dm-log.c's reason."""
    from dmtools.engine import Engine
    from dmtools.errors import InvalidTable

    legs = " ".join(f"{leg} 0" for leg in _loops(make_image, make_loop, 2))
    small = _loops(make_image, make_loop, 1, size=1024)[0]
    rdev = os.stat(small).st_rdev
    cases = [(f"bogus 1 x 2 {legs}", 'Module for logging type "bogus" not found.'),
             (f"disk 2 {small} {REGION} 2 {legs}",  # 1024 + 16 bitmap bytes, in 512-byte blocks
              f"log device {os.major(rdev)}:{os.minor(rdev)} too small: need 1536 bytes")]
    eng = Engine()
    try:
        for params, reason in cases:
            for dm, name in ((kernel_dm, dm_name), (eng, "ubad")):
                with pytest.raises(InvalidTable) as exc:
                    dm.create(name, f"0 {SECTORS} mirror {params}")
                assert "mirror: Error creating mirror dirty log" in str(exc.value), (dm.backend, exc.value)
                assert reason in str(exc.value), (dm.backend, exc.value)
                assert not dm.exists(name)
    finally:
        eng.close()
