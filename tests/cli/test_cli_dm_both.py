"""``dmtools dm …`` behaves the same on both backends: one test, parametrized over them.

``userspace`` (root tier) drives the session's daemon and its exposed devices; ``kernel`` (kernel tier,
in the VM) drives real device-mapper. The expectations are written once, in dmsetup's formats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_lazy_fixtures import lf

from cli_helpers import MiB, Devices, devno, read_at, write_synced
from dmtools.cli import main as cli_main
from dmtools.errors import DeviceBusy, DeviceExists, DeviceNotFound, InvalidTable

class Harness(Devices):
    """The CLI on one backend, plus that backend's own handle for paths and cleanup."""

    def __init__(self, backend: str, dm: Any, capsys: pytest.CaptureFixture[str], base: str) -> None:
        super().__init__(base, dm)
        self.backend = backend
        self.capsys = capsys

    def __call__(self, *argv: str) -> str:
        self.capsys.readouterr()
        assert cli_main.main(["--backend", self.backend, "dm", *argv], propagate=True) == 0
        return self.capsys.readouterr().out

    def path(self, name: str) -> str:
        return self.dm.device_path(name)


@pytest.fixture
def userspace_cli(capsys: pytest.CaptureFixture[str], dm_name: str, make_loop: Any) -> Iterator[Harness]:
    """The CLI on the session's daemon, its devices exposed (root tier)."""
    import dmtools

    h = Harness("userspace", dmtools.open("userspace"), capsys, dm_name)
    try:
        yield h
    finally:
        try:
            h.cleanup()
        finally:
            h.dm.close()


@pytest.fixture
def kernel_cli(kernel_dm: Any, capsys: pytest.CaptureFixture[str], dm_name: str, make_loop: Any) -> Iterator[Harness]:
    """The CLI on real device-mapper (kernel tier); the plugin's ``kernel_dm`` closes it."""
    h = Harness("kernel", kernel_dm, capsys, dm_name)
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture(
    params=[
        pytest.param(lf("userspace_cli"), id="userspace", marks=pytest.mark.root),
        pytest.param(lf("kernel_cli"), id="kernel", marks=pytest.mark.kernel),
    ]
)
def dmcli(request: pytest.FixtureRequest) -> Harness:
    harness: Harness = request.param
    return harness


@pytest.fixture
def loops(make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> tuple[Any, Any]:
    return make_loop(make_image(4 * MiB)), make_loop(make_image(4 * MiB))


def test_same_lifecycle_and_output(dmcli: Harness, loops: tuple[Any, Any]) -> None:
    la, lb = loops
    a, b = devno(la.path), devno(lb.path)
    name = dmcli.name("same")
    dmcli("create", name, "--table", f"0 2048 linear {la.path} 0;2048 1024 zero;3072 1024 linear {lb.path} 16")
    assert dmcli("table", name) == f"0 2048 linear {a} 0\n2048 1024 zero \n3072 1024 linear {b} 16\n"
    assert dmcli("status", name) == "0 2048 linear \n2048 1024 zero \n3072 1024 linear \n"
    assert sorted(json.loads(dmcli("deps", name, "--json"))[name]) == sorted([a, b])
    info = dmcli("info", name).splitlines()
    assert info[0] == f"Name:              {name}"
    assert info[1] == "State:             ACTIVE"
    assert info[2].startswith("Read Ahead:        ")  # an exposed block device has one
    assert info[3:6] == ["Tables present:    LIVE", "Open count:        0", "Event number:      0"]
    assert info[6] == "Major, minor:      {}, {}".format(*devno(dmcli.path(name)).split(":"))
    assert info[7:] == ["Number of targets: 3", ""]
    assert f"{name}\t({devno(dmcli.path(name))})" in dmcli("ls").splitlines()

    data = os.urandom(MiB)
    write_synced(dmcli.path(name), (0, data), (3072 * 512, data[: 1024 * 512]))
    assert read_at(la.path, 0, MiB) == data
    assert read_at(lb.path, 16 * 512, 1024 * 512) == data[: 1024 * 512]

    dmcli("load", name, "--table", f"0 1024 linear {lb.path} 16")
    assert "Tables present:    LIVE & INACTIVE" in dmcli("info", name).splitlines()
    assert dmcli("table", "--inactive", name) == f"0 1024 linear {b} 16\n"
    dmcli("suspend", name)
    assert "State:             SUSPENDED" in dmcli("info", name).splitlines()
    dmcli("resume", name)
    assert dmcli("table", name) == f"0 1024 linear {b} 16\n"
    assert "Tables present:    LIVE" in dmcli("info", name).splitlines()

    new = dmcli.name("renamed")
    dmcli("rename", name, new)
    names = [e["name"] for e in json.loads(dmcli("ls", "--json"))]
    assert new in names and name not in names
    dmcli("remove", new)
    assert new not in dmcli("ls")
    assert dmcli.cleanup() == []


def test_same_errors(dmcli: Harness, loops: tuple[Any, Any]) -> None:
    la, _ = loops
    name = dmcli.name("errs")
    dmcli("create", name, "--table", f"0 1024 linear {la.path} 0")
    live = dmcli("table", name)
    with pytest.raises(DeviceExists):
        dmcli("create", name, "--table", "0 8 zero")
    with pytest.raises(DeviceNotFound):
        dmcli("info", dmcli.name("absent"))
    with pytest.raises(InvalidTable):  # an unknown target type: refused at load, nothing changed
        dmcli("load", name, "--table", "0 8 no-such-target")
    assert "Tables present:    LIVE" in dmcli("info", name).splitlines()

    # beyond the end of the device: the load is taken, the resume refuses it (the kernel checks
    # the device area when it computes the queue limits on resume); the device is left suspended
    # with its old table and no inactive one, and a plain resume brings it back
    dmcli("load", name, "--table", f"0 999999 linear {la.path} 0")
    with pytest.raises(InvalidTable, match="too small"):
        dmcli("resume", name)
    info = dmcli("info", name).splitlines()
    assert "State:             SUSPENDED" in info and "Tables present:    LIVE" in info
    dmcli("resume", name)
    assert dmcli("table", name) == live and "State:             ACTIVE" in dmcli("info", name)

    fd = os.open(dmcli.path(name), os.O_RDONLY)
    try:
        assert "Open count:        1" in dmcli("info", name).splitlines()
        with pytest.raises(DeviceBusy):
            dmcli("remove", name)
    finally:
        os.close(fd)
    dmcli("remove", name)
    assert dmcli.cleanup() == []


def test_open_count_counts_opens_not_descriptors(dmcli: Harness) -> None:
    """One open shared with a child process (an inherited descriptor) is one open, as the kernel
    counts in ``dm_blk_open``; the engine tells shared opens apart with kcmp(KCMP_FILE)."""
    import subprocess
    import sys

    name = dmcli.name("opens")
    dmcli("create", name, "--table", "0 64 zero")
    fd = os.open(dmcli.path(name), os.O_RDONLY)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE, pass_fds=(fd,))
    try:
        assert "Open count:        1" in dmcli("info", name).splitlines()
    finally:
        child.communicate(timeout=60)
        os.close(fd)
    assert "Open count:        0" in dmcli("info", name).splitlines()
    dmcli("remove", name)
    assert dmcli.cleanup() == []


# --- who counts as an opener: the same users give the same count on both backends ------------------
# (the userspace engine finds them without opening its loop device: dmtools.engine.openers)
def _open_count(dmcli: Harness, name: str) -> int:
    line = next(ln for ln in dmcli("info", name).splitlines() if ln.startswith("Open count:"))
    return int(line.split(":")[1])


@pytest.fixture
def writable(dmcli: Harness, make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> str:
    """A 32 MiB device over a loop device (``linear``), named for this test."""
    lo = make_loop(make_image(32 * MiB))
    name = dmcli.name("open")
    dmcli("create", name, "--table", f"0 {32 * MiB // 512} linear {lo.path} 0")
    return name


def test_open_count_of_descriptors_dup_and_fork(dmcli: Harness, writable: str) -> None:
    import subprocess
    import sys

    path = dmcli.path(writable)
    fd = os.open(path, os.O_RDONLY)
    dup = os.dup(fd)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE, pass_fds=(fd,))
    try:
        assert _open_count(dmcli, writable) == 1  # one open: a dup and a child's inherited copy
        other = os.open(path, os.O_RDONLY)
        assert _open_count(dmcli, writable) == 2
        os.close(other)
        excl = os.open(path, os.O_RDONLY | os.O_EXCL)  # an O_EXCL opener is one open, not two
        assert _open_count(dmcli, writable) == 2
        os.close(excl)
    finally:
        child.communicate(timeout=60)
        os.close(dup)
        os.close(fd)
    assert _open_count(dmcli, writable) == 0
    dmcli("remove", writable)
    assert dmcli.cleanup() == []


def test_open_count_of_a_mount_in_any_namespace(dmcli: Harness, writable: str, tmp_path: Path) -> None:
    import subprocess

    path = dmcli.path(writable)
    subprocess.run(["mkfs.ext4", "-q", "-F", path], check=True, timeout=120)
    mnt, bind = tmp_path / "mnt", tmp_path / "bind"
    mnt.mkdir()
    bind.mkdir()
    subprocess.run(["mount", path, str(mnt)], check=True, timeout=60)
    try:
        assert _open_count(dmcli, writable) == 1
        subprocess.run(["mount", "--bind", str(mnt), str(bind)], check=True, timeout=60)
        assert _open_count(dmcli, writable) == 1  # one super block
        subprocess.run(["umount", str(bind)], check=True, timeout=60)
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    assert _open_count(dmcli, writable) == 0
    # mounted only in another mount namespace, which a sleeping process keeps
    ns = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f'mount "$0" "$1" && echo up && exec sleep 60', path, str(mnt)],
                          stdout=subprocess.PIPE)
    try:
        assert ns.stdout is not None and ns.stdout.readline() == b"up\n"
        assert not os.path.ismount(mnt)
        assert _open_count(dmcli, writable) == 1
    finally:
        ns.kill()
        ns.wait(30)
        ns.stdout.close()  # type: ignore[union-attr]
    assert _open_count(dmcli, writable) == 0
    dmcli("remove", writable)
    assert dmcli.cleanup() == []


def test_open_count_of_swap_and_a_loop_over_it(dmcli: Harness, writable: str) -> None:
    import platform
    import subprocess

    from dmtools import loop
    from dmtools.engine.openers import _swap_opens

    path = dmcli.path(writable)
    subprocess.run(["mkswap", "-q", path], check=True, timeout=60)
    subprocess.run(["swapon", "-p", "-2", path], check=True, timeout=60)
    try:  # two opens before Linux 6.10 (the VM's 6.1), one after (this host's 6.18)
        assert _open_count(dmcli, writable) == _swap_opens(platform.release())
    finally:
        subprocess.run(["swapoff", path], check=True, timeout=60)
    assert _open_count(dmcli, writable) == 0
    upper = loop.attach(path, read_only=True)
    try:
        assert _open_count(dmcli, writable) == 1  # the loop driver keeps the file it was given
    finally:
        loop.detach(upper)
    assert _open_count(dmcli, writable) == 0
    dmcli("remove", writable)
    assert dmcli.cleanup() == []
