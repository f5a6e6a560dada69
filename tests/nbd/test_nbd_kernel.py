"""Kernel tier: nbd attach of nbdkit exports through netlink, kernel linear and mirror tables over
/dev/nbdN, data checked on the servers, then detach (run in the VM: scripts/vmtest tests/nbd)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools import linux
from dmtools.blockdev import BlockDevice, aligned_buffer
from dmtools.cli.main import main
from dmtools.errors import DeviceBusy, DeviceIOError, InvalidArgument
from dmtools.nbd import NbdEndpoint, kernel
from dmtools.testing.nbdserver import NbdServer

pytestmark = pytest.mark.kernel

MiB = 1 << 20


def _dmtools(*args: str) -> str:
    """Run the CLI in this process (a new interpreter per call is slow in the emulated VM)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args), propagate=True) == 0
    return out.getvalue()


def _server_bytes(srv: NbdServer, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    with NbdEndpoint(srv.uri) as ep:
        ep.readinto(buf, offset)
    return bytes(buf)


def _write_through(path: str, offset: int, data: bytes) -> None:
    with BlockDevice(path, writable=True) as dev:
        assert dev.write(data, offset) == len(data)
        dev.flush()


@pytest.fixture
def attached() -> Iterator[Callable[..., str]]:
    """``attach(uri, *cli_options)`` → /dev/nbdN through the CLI; detached at teardown."""
    devices: list[str] = []

    def attach(uri: str, *options: str) -> str:
        path = _dmtools("nbd", "attach", uri, *options).strip()
        devices.append(path)
        return path

    yield attach
    for path in devices:
        try:
            kernel.detach(path)
        except InvalidArgument:  # detached by the test
            pass


def _wait_size(path: str, size: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        with BlockDevice(path) as dev:
            if dev.size == size:
                return
        assert time.monotonic() < deadline, f"{path} never showed {size} bytes"
        time.sleep(0.05)


def test_attach_io_list_detach(start_nbdkit: Callable[..., NbdServer], attached: Callable[..., str]) -> None:
    srv = start_nbdkit(["memory", "64M"])
    path = attached(srv.uri)
    _wait_size(path, 64 * MiB)
    listing = json.loads(_dmtools("nbd", "list", "--json"))
    mine = [d for d in listing if d["path"] == path]
    assert mine and mine[0]["connected"] and mine[0]["size"] == 64 * MiB
    assert mine[0]["backend"].endswith(f"socket={srv.socket}")
    data = os.urandom(MiB)
    _write_through(path, 5 * MiB, data)
    assert _server_bytes(srv, 5 * MiB, MiB) == data  # it reached the server
    with NbdEndpoint(srv.uri, writable=True) as ep:
        ep.write(b"\x5a" * 4096, 0)
    buf = aligned_buffer(4096)
    with BlockDevice(path, direct=True) as dev:
        dev.readinto(buf, 0)
    assert bytes(buf) == b"\x5a" * 4096
    with pytest.raises(DeviceBusy):
        kernel.attach(srv.uri, device=path)  # in use
    _dmtools("nbd", "detach", path)
    assert path not in [d["path"] for d in json.loads(_dmtools("nbd", "list", "--json"))]
    with pytest.raises(InvalidArgument, match="nothing is attached"):
        kernel.detach(path)


def test_read_only_attach(start_nbdkit: Callable[..., NbdServer], attached: Callable[..., str]) -> None:
    srv = start_nbdkit(["memory", "8M"])
    path = attached(srv.uri, "--read-only")
    _wait_size(path, 8 * MiB)
    assert [d for d in kernel.list_devices() if d.path == path][0].read_only
    fd = os.open(path, os.O_RDONLY)
    try:
        assert struct.unpack("i", fcntl.ioctl(fd, linux.BLKROGET, b"\0" * 4))[0] == 1
    finally:
        os.close(fd)
    # The kernel lets a read-only disk be opened for writing; nbd.c fails the write itself
    # ("Write on read-only"), so a direct write gets EIO and the server sees nothing.
    buf = aligned_buffer(4096)
    buf[:] = b"\x77" * 4096
    with BlockDevice(path, writable=True, direct=True) as dev, pytest.raises(DeviceIOError):
        dev.write(buf, 0)
    assert _server_bytes(srv, 0, 4096) == bytes(4096)


def test_an_attached_device_is_its_export(start_nbdkit: Callable[..., NbdServer], attached: Callable[..., str],
                                          tmp_path: Path) -> None:
    """/dev/nbdN attached by `dmtools nbd attach` is the export its backend names: a copy from the
    export (named through a symlink to its socket) onto an overlapping range of the device is
    refused before any I/O, a disjoint one runs. Before, the device was a disk of its own."""
    import kcopyd
    from dmtools.identity import identify

    srv = start_nbdkit(["memory", "8M"])
    path = attached(srv.uri)
    _wait_size(path, 8 * MiB)
    (tmp_path / "link.sock").symlink_to(srv.socket)
    uri = f"nbd+unix:///?socket={tmp_path}/link.sock"
    assert identify(path).overlaps(identify(uri))
    with kcopyd.Client(num_pages=256) as kc:
        with pytest.raises(InvalidArgument, match="one NBD export"):
            kc.copy(kcopyd.Region(uri, 0, 2048), [kcopyd.Region(path, 8, 2048)])
        job = kc.copy(kcopyd.Region(uri, 0, 2048), [kcopyd.Region(path, 4096, 2048)])
        assert job.wait(60) and job.ok


def test_kernel_linear_and_mirror_over_nbd(start_nbdkit: Callable[..., NbdServer], attached: Callable[..., str],
                                           kernel_dm: Any, dm_name: str) -> None:
    a_srv = start_nbdkit(["memory", "32M"])
    b_srv = start_nbdkit(["memory", "32M"])
    a, b = attached(a_srv.uri), attached(b_srv.uri)
    _wait_size(a, 32 * MiB)
    _wait_size(b, 32 * MiB)
    lin = dm_name[: -len("-dmtt")] + "l-dmtt"
    mir = dm_name[: -len("-dmtt")] + "m-dmtt"
    made = []
    try:
        # linear: sectors 0..8191 of the device are a's sectors 2048..10239.
        kernel_dm.create(lin, f"0 8192 linear {a} 2048")
        made.append(lin)
        data = os.urandom(MiB)
        _write_through(kernel_dm.device_path(lin), MiB, data)
        assert _server_bytes(a_srv, MiB + MiB, MiB) == data
        kernel_dm.remove(lin, retry=True)
        made.remove(lin)
        # mirror of the two exports (nosync: both are all zeros already), written through the kernel.
        kernel_dm.create(mir, f"0 32768 mirror core 2 1024 nosync 2 {a} 0 {b} 0")
        made.append(mir)
        data = os.urandom(4 * MiB)
        _write_through(kernel_dm.device_path(mir), 8 * MiB, data)
        assert _server_bytes(a_srv, 8 * MiB, 4 * MiB) == data
        assert _server_bytes(b_srv, 8 * MiB, 4 * MiB) == data
        status = kernel_dm.status(mir)[0].params
        assert " AA " in f" {status} ", status
    finally:
        for name in made:
            kernel_dm.remove(name, retry=True)
