"""A thin device's block writes to a data file the engine opened: one ``pwrite`` on its buffered
descriptor (``thin.targets.thin._writer_of``), and the checked write for what that does not finish."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from dmtools.engine.backing import BackingDevice
from dmtools.errors import DMError
from target_rig import BB, PoolRig, file_bytes, pattern, read


def _record(monkeypatch: pytest.MonkeyPatch, data: Path, fail: list[Any]) -> tuple[list[tuple[int, int]],
                                                                                list[tuple[int, int]]]:
    """Record ``(offset, length)`` of every ``os.pwrite`` and every ``BackingDevice.write`` to the
    file ``data`` from now on; ``fail``'s items, taken one per ``pwrite``, make it raise (an ``OSError``) or write only
    that many bytes (an int); ``None`` writes all."""
    pwrites: list[tuple[int, int]] = []
    checked: list[tuple[int, int]] = []
    real_pwrite, real_write = os.pwrite, BackingDevice.write

    def pwrite(fd: int, buf: Any, offset: int) -> int:
        pwrites.append((offset, len(buf)))
        how = fail.pop(0) if fail else None
        if isinstance(how, OSError):
            raise how
        return real_pwrite(fd, memoryview(buf)[:how], offset)

    def write(self: BackingDevice, buf: Any, offset: int) -> int:
        if self.path == str(data):
            checked.append((offset, len(memoryview(buf))))
        return real_write(self, buf, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(BackingDevice, "write", write)
    return pwrites, checked


def test_block_writes_are_one_pwrite_to_the_data_file(rig: PoolRig, monkeypatch: pytest.MonkeyPatch) -> None:
    pwrites, checked = _record(monkeypatch, rig.data, [])
    t = rig.thin(1, "t1")
    t.write(pattern(1, 4096), 3 * BB + 8192)  # a first write (its data block is a hole: no zeroing)
    t.write(pattern(2, 4096), 3 * BB)  # a rewrite
    pool = rig.in_core()
    block = pool.md.find(1, 3)[0]
    data_writes = [w for w in pwrites if w[1] == 4096]
    assert data_writes == [(block * BB + 8192, 4096), (block * BB, 4096)]
    assert not [w for w in checked if w[1] == 4096]
    assert file_bytes(rig.data, block * BB, 3 * 4096) == pattern(2, 4096) + bytes(4096) + pattern(1, 4096)
    t.flush()
    assert read(t, 3 * BB, 3 * 4096) == pattern(2, 4096) + bytes(4096) + pattern(1, 4096)


@pytest.mark.parametrize("fail", [OSError(errno.EINTR, "interrupted"), 1000, 0], ids=["error", "short", "none"])
def test_what_a_pwrite_leaves_goes_through_the_checked_write(rig: PoolRig, monkeypatch: pytest.MonkeyPatch,
                                                            fail: Any) -> None:
    pwrites, checked = _record(monkeypatch, rig.data, [None, fail, fail])
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)  # block 0 mapped (a whole-block write)
    t.write(pattern(2, 4096), 4096)  # a rewrite of block 0
    t.write(pattern(3, 4096), BB)  # a first write of block 1
    pool = rig.in_core()
    b0, b1 = pool.md.find(1, 0)[0], pool.md.find(1, 1)[0]
    done = 0 if isinstance(fail, OSError) else fail
    assert pwrites == [(b0 * BB, BB), (b0 * BB + 4096, 4096), (b1 * BB, 4096)]
    assert [w for w in checked if w[1] < BB] == [(b0 * BB + 4096 + done, 4096 - done), (b1 * BB + done, 4096 - done)]
    t.flush()
    assert read(t, 0, 2 * 4096) == pattern(1, 4096) + pattern(2, 4096)
    assert read(t, BB, 4096) == pattern(3, 4096)
    assert file_bytes(rig.data, b1 * BB, 4096) == pattern(3, 4096)


def test_a_failed_first_write_gives_its_block_back(rig: PoolRig, monkeypatch: pytest.MonkeyPatch) -> None:
    _record(monkeypatch, rig.data, [None, OSError(errno.EIO, "I/O error")])
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    used = rig.status().used_data

    def broken(self: BackingDevice, buf: Any, offset: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(BackingDevice, "write", broken)
    with pytest.raises((DMError, OSError)):
        t.write(pattern(2, 4096), BB)
    monkeypatch.undo()
    pool = rig.in_core()
    assert pool.md.find(1, 1) is None
    assert rig.status().used_data == used
    assert pool.prison.held() == 0 and not pool.prison._count
    t.write(pattern(3, 4096), BB)  # the block is free again and the device writes on
    assert read(t, BB, 4096) == pattern(3, 4096)
