"""The Linux numbers in :mod:`dmtools.linux` are the uapi headers' values (x86-64 encoding)."""

from __future__ import annotations

import builtins
import ctypes
import errno
import os
from pathlib import Path

import pytest

from dmtools import linux


def test_block_ioctls_match_include_uapi_linux_fs_h() -> None:
    # _IO(0x12, nr) is 0x12 << 8 | nr; BLKGETSIZE64 is _IOR(0x12, 114, size_t).
    assert (linux.BLKROSET, linux.BLKROGET, linux.BLKSSZGET) == (0x125D, 0x125E, 0x1268)
    assert (linux.BLKDISCARD, linux.BLKPBSZGET, linux.BLKZEROOUT) == (0x1277, 0x127B, 0x127F)
    assert linux.BLKGETSIZE64 == 0x80081272


def test_loop_ioctls_match_include_uapi_linux_loop_h() -> None:
    # 'L' << 8 | nr
    assert (linux.LOOP_SET_FD, linux.LOOP_CLR_FD, linux.LOOP_SET_STATUS64) == (0x4C00, 0x4C01, 0x4C04)
    assert (linux.LOOP_SET_CAPACITY, linux.LOOP_SET_DIRECT_IO, linux.LOOP_CONFIGURE) == (0x4C07, 0x4C08, 0x4C0A)
    assert (linux.LOOP_GET_STATUS64, linux.LOOP_SET_BLOCK_SIZE, linux.LOOP_CTL_GET_FREE) == (0x4C05, 0x4C09, 0x4C82)


def test_dm_dev_arm_poll_is_iowr_on_struct_dm_ioctl() -> None:
    from dmtools.kernel import _DM_IOCTL

    assert _DM_IOCTL.size == linux.DM_IOCTL_SIZE == 312
    assert linux.DM_DEV_ARM_POLL == 0xC138FD10


def test_devno_is_ascii_digits_only() -> None:
    assert linux.DEVNO.fullmatch("253:0") and linux.DEVNO.fullmatch("7:12")
    for text in ("253:", ":0", "253:0x", "253 :0", "\u0662\u0665\u0663:0", "/dev/dm-0"):
        assert not linux.DEVNO.fullmatch(text), text


def test_libc_is_loaded_once_and_keeps_errno() -> None:
    assert linux.libc() is linux.libc()
    assert linux.libc().close(-1) == -1
    assert ctypes.get_errno() == errno.EBADF


def test_mounts_read_this_process_mount_table() -> None:
    devno, fstype = {point: (devno, fstype) for devno, point, fstype, _ in linux.mounts()}["/proc"]
    st = os.stat("/proc")
    assert (fstype, devno) == ("proc", f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}")


def test_mounts_unescape_the_mount_point_and_skip_a_short_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "mountinfo"  # proc(5): optional fields before " - ", then type, source, options
    info.write_text("36 35 98:0 /mnt1 /mnt/my\\040dir rw,noatime master:1 - fuse.dmtools dmtools rw\n"
                    "37 35 98:1 / /short rw - ext4\n")
    monkeypatch.setattr(linux, "open", lambda path: builtins.open(info), raising=False)
    assert linux.mounts() == [("98:0", "/mnt/my dir", "fuse.dmtools", "dmtools")]


def test_udev_running_tells_a_stale_socket_from_a_live_one(tmp_path: Path) -> None:
    import socket

    from dmtools.events import udev_running

    assert udev_running is linux.udev_running  # the events package names the same function
    path = str(tmp_path / "control")
    assert linux.udev_running(path) is False  # absent
    live = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    live.bind(path)
    live.listen(1)
    try:
        assert linux.udev_running(path) is True
    finally:
        live.close()
    assert os.path.exists(path)  # the socket file outlives its listener, as udevd's does
    assert linux.udev_running(path) is False


def test_sysfs_attr_reads_bytes_as_fsdecode_and_none_when_missing(tmp_path: Path) -> None:
    attr = tmp_path / "backing_file"
    attr.write_bytes(b"/x/\xff name \n")
    assert linux.sysfs_attr(str(attr)) == os.fsdecode(b"/x/\xff name ")  # only the newline goes
    assert linux.sysfs_attr(str(tmp_path / "gone")) is None
    assert linux.block_attr((0, 0), "size") is None  # no block device 0:0


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def test_a_zombie_leader_with_a_live_thread_is_not_gone() -> None:
    """A SIGKILLed daemon's leader turns zombie at once while its other threads finish (seen here:
    state Z with 2 tasks for 28-67 ms): they still hold its socket and lock, so it has not exited.
    Reproduced with a leader that ends by ``pthread_exit`` while a thread sleeps on."""
    import subprocess
    import sys

    from dmtools.testing.wait import wait_until

    code = ("import ctypes, threading, time\n"
            "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "ctypes.CDLL(None).pthread_exit(None)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_until(lambda: _state(proc.pid) == "Z", "the leader to exit")
        assert len(os.listdir(f"/proc/{proc.pid}/task")) == 2
        assert not linux.process_gone(proc.pid)
    finally:
        proc.kill()
    wait_until(lambda: linux.process_gone(proc.pid), "the process to exit")  # a zombie now: not reaped yet
    assert _state(proc.pid) == "Z"
    proc.wait()
    assert linux.process_gone(proc.pid)
