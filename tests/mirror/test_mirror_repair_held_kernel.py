"""Kernel tier (run: scripts/vmtest): the kernel's dm-mirror holds a write after a leg failure
(handle_errors without keep_log); ``MirrorManager.repair`` suspends with noflush, so the held write
is requeued to the repaired table instead of failing with EIO."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from dmtools.blockdev import BlockDevice, aligned_buffer
from dmtools.testing.wait import wait_until
from mirror.manager import MirrorManager
from test_mirror_kernel import SECTORS, SIZE, _loops, _read

pytestmark = pytest.mark.kernel

REGION = 128
OFFSET = 5 * 65536
WAIT = 60.0


def test_kernel_held_write_completes_after_repair(kernel_dm: Any, make_image: Any, make_loop: Any,
                                                  dm_name: str) -> None:
    leg0, leg1, leg2 = _loops(make_image, make_loop, 3, data=os.urandom(SIZE))
    mm = MirrorManager(kernel_dm)
    l1 = f"{dm_name[:-5]}-l1-dmtt"
    kernel_dm.create(l1, f"0 {SECTORS} linear {leg1} 0")
    done = threading.Event()
    errors: list[BaseException] = []
    data = aligned_buffer(65536)
    data[:] = b"h" * 65536
    try:
        mm.create(dm_name, [leg0, kernel_dm.device_path(l1)], region_size=REGION, nosync=True, handle_errors=True)
        kernel_dm.load(l1, f"0 {SECTORS} error")
        kernel_dm.resume(l1)
        path = kernel_dm.device_path(dm_name)

        def write() -> None:
            try:
                with BlockDevice(path, writable=True, direct=True) as dev:
                    dev.write(data, OFFSET)
                    dev.flush()
            except BaseException as err:  # noqa: BLE001 - checked below
                errors.append(err)
            done.set()

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        wait_until(lambda: mm.status(dm_name).health == "AD", "the kernel to report the failed leg", WAIT)
        assert not done.wait(0.5), "the kernel did not hold the write"
        st = mm.repair(dm_name, 1, leg2)
        assert done.wait(WAIT), "held write never completed after the repair"
        thread.join(WAIT)
        assert not errors, errors
        assert st.fully_in_sync and st.health == "AA"
        assert _read(leg2)[OFFSET:OFFSET + 65536] == b"h" * 65536
        assert _read(leg0) == _read(leg2)
    finally:
        for name in (dm_name, l1):
            if kernel_dm.exists(name):
                kernel_dm.remove(name, retry=True)
