"""Unit tier: the loop index is kept until a uevent about a loop device (or a lost one) arrives.

The kernel's uevent socket is the seam: a datagram socket pair stands in for it, and the scan is
counted, so each case states exactly when the index is rebuilt.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import pytest

from dmtools import loop_index
from dmtools.loop_index import LoopIndex, LoopRef

REF = LoopRef("/dev/loop7", (7, 7), "/srv/a.img")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A LoopIndex whose uevents come from ``fake.send`` and whose scans are counted."""
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    scans: list[int] = []

    def scan() -> tuple[dict[tuple[int, int], list[LoopRef]], dict[str, list[LoopRef]]]:
        scans.append(1)
        return {(1, 2): [REF]}, {"/fuse/f": [REF]}

    def reopen(self: LoopIndex) -> None:
        self._sock, self._pid, self._by_inode = ours, os.getpid(), None

    monkeypatch.setattr(loop_index, "_scan", scan)
    monkeypatch.setattr(LoopIndex, "_reopen", reopen)

    class Fake:
        index = LoopIndex()
        count = scans

        @staticmethod
        def send(header: bytes) -> None:
            kernel.send(header + b"\0ACTION=change\0SUBSYSTEM=block\0")

    yield Fake
    kernel.close()
    ours.close()


def test_kept_until_a_loop_uevent(fake: Any) -> None:
    idx = fake.index
    assert idx.over_inode(1, 2) == [REF] and len(fake.count) == 1
    assert idx.over_inode(3, 4) == [] and idx.over_path("/fuse/f") == [REF]
    assert len(fake.count) == 1  # kept
    fake.send(b"change@/devices/virtual/block/dm-3")  # not a loop device
    fake.send(b"add@/devices/virtual/net/veth0")
    assert idx.over_inode(1, 2) == [REF] and len(fake.count) == 1
    fake.send(b"change@/devices/virtual/block/loop9")  # an attach or detach
    assert idx.over_inode(1, 2) == [REF] and len(fake.count) == 2
    assert idx.over_inode(1, 2) == [REF] and len(fake.count) == 2
    fake.send(b"add@/devices/virtual/block/loop12")  # a new loop device
    fake.send(b"change@/devices/virtual/block/loop12")
    idx.over_path("/fuse/f")
    assert len(fake.count) == 3  # two uevents, one rescan
    idx.invalidate()
    idx.over_inode(1, 2)
    assert len(fake.count) == 4


def test_lost_uevents_or_no_socket_mean_a_scan_each_time(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    idx = fake.index
    idx.over_inode(1, 2)

    class Overflowed:
        calls = 0

        def recv(self, size: int) -> bytes:
            Overflowed.calls += 1
            if Overflowed.calls == 1:
                raise OSError(errno.ENOBUFS, "No buffer space available")
            raise BlockingIOError

    idx._sock = Overflowed()
    idx.over_inode(1, 2)
    assert len(fake.count) == 2
    idx._sock = None  # no uevent socket in this network namespace
    idx.over_inode(1, 2)
    idx.over_inode(1, 2)
    assert len(fake.count) == 4


def test_a_forked_child_uses_its_own_socket(fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    idx = fake.index
    idx.over_inode(1, 2)
    idx._pid = -1  # as seen from a child after fork: the parent's socket queue is not ours
    idx.over_inode(1, 2)
    assert len(fake.count) == 2
