"""Unit tier: the loop index reads every loop device once, then only those a uevent names.

The kernel's uevent socket and sysfs are the seams: a datagram socket pair stands in for the
socket, and a dict for what sysfs and ``LOOP_GET_STATUS64`` say of each loop device, so each case
states exactly which devices are read again.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

import pytest

from dmtools import loop_index
from dmtools.loop_index import LoopIndex, LoopRef


def ref(n: int) -> LoopRef:
    return LoopRef(f"/dev/loop{n}", (7, n), f"/srv/{n}.img")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A LoopIndex over the loop devices in ``fake.bound`` (name -> inode key or FUSE path)."""
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)

    class Fake:
        bound: dict[str, Any] = {"loop1": (1, 10), "loop2": "/fuse/f"}
        reads: list[str] = []
        index = LoopIndex()

        @staticmethod
        def send(header: bytes) -> None:
            kernel.send(header + b"\0ACTION=change\0SUBSYSTEM=block\0")

    def entry(name: str, fuse: list[str]) -> Any:
        Fake.reads.append(name)
        key = Fake.bound.get(name)
        return None if key is None else (key, ref(int(name[4:])))

    def reopen(self: LoopIndex) -> None:
        self._sock, self._pid, self._entries = ours, os.getpid(), None

    monkeypatch.setattr(loop_index, "_entry", entry)
    monkeypatch.setattr(loop_index, "loop_names", lambda: sorted(Fake.bound) + ["loop0"])
    monkeypatch.setattr(loop_index, "_fuse_mounts", lambda: [])
    monkeypatch.setattr(LoopIndex, "_reopen", reopen)
    yield Fake
    kernel.close()
    ours.close()


def test_kept_until_a_loop_uevent_then_that_device_read_again(fake: Any) -> None:
    idx = fake.index
    assert idx.over_inode(1, 10) == [ref(1)] and idx.over_path("/fuse/f") == [ref(2)]
    assert sorted(fake.reads) == ["loop0", "loop1", "loop2"] and idx.scans == 1
    fake.reads.clear()
    assert idx.over_inode(3, 30) == [] and fake.reads == []  # kept
    fake.send(b"change@/devices/virtual/block/dm-3")  # not a loop device
    fake.send(b"add@/devices/virtual/net/veth0")
    assert idx.over_inode(1, 10) == [ref(1)] and fake.reads == []
    fake.bound["loop3"] = (3, 30)  # attached after the index was built
    fake.send(b"change@/devices/virtual/block/loop3")
    assert idx.over_inode(3, 30) == [ref(3)] and fake.reads == ["loop3"]
    del fake.bound["loop1"]  # detached, seen through its partition's event too
    fake.send(b"remove@/devices/virtual/block/loop1/loop1p1")
    fake.send(b"change@/devices/virtual/block/loop1")
    assert idx.over_inode(1, 10) == [] and fake.reads == ["loop3", "loop1"]
    assert idx.scans == 1 and idx.updates == 2


def test_lost_uevents_or_no_socket_mean_reading_every_device(fake: Any) -> None:
    idx = fake.index
    idx.over_inode(1, 10)

    class Overflowed:
        calls = 0

        def recv(self, size: int) -> bytes:
            Overflowed.calls += 1
            if Overflowed.calls == 1:
                raise OSError(errno.ENOBUFS, "No buffer space available")
            raise BlockingIOError

    idx._sock = Overflowed()
    idx.over_inode(1, 10)
    assert idx.scans == 2
    idx._sock = None  # no uevent socket in this network namespace
    idx.over_inode(1, 10)
    idx.over_inode(1, 10)
    assert idx.scans == 4


def test_a_forked_child_uses_its_own_socket(fake: Any) -> None:
    idx = fake.index
    idx.over_inode(1, 10)
    idx._pid = -1  # as seen from a child after fork: the parent's socket queue is not ours
    idx.over_inode(1, 10)
    assert idx.scans == 2
