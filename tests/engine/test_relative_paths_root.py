"""The ``dev/loopN`` case of issue 15 item 4, root tier: a relative path is the caller's file.

The caller's working directory holds a regular file ``dev/loopN`` while a real ``/dev/loopN`` is
attached. ``dm create … linear dev/loopN 0`` must map the local file and ``snapshot create --cow
dev/loopN`` must write its header there, through the daemon (a process with a working directory of
its own, ``/``) and in-process; the real loop device's bytes never change.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_lazy_fixtures import lf

from dmtools.cli import main as cli_main

pytestmark = pytest.mark.root

SIZE = 1 << 20
SNAP_MAGIC = 0x70416E53  # dm-snap-persistent.c SNAP_MAGIC, the COW header's first word


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Backend:
    """The CLI on the backend under test, and that backend's ``DeviceMapper`` to read devices."""

    def __init__(self, dm: Any, argv: list[str]) -> None:
        self.dm = dm
        self._argv = argv

    def __call__(self, *argv: str) -> int:
        return cli_main.main([*self._argv, *argv], propagate=True)

    def read(self, name: str) -> bytes:
        buf = bytearray(SIZE)
        with self.dm.open_endpoint(name, writable=False) as ep:
            assert ep.readinto(buf, 0) == SIZE
        return bytes(buf)


@pytest.fixture
def daemon_cli(private_daemon: Any) -> Backend:
    """The daemon: its own process, working directory ``/``."""
    assert os.readlink(f"/proc/{private_daemon.ping()['pid']}/cwd") == "/"
    return Backend(private_daemon, ["--backend", "userspace"])


@pytest.fixture
def in_process_cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """An in-process engine behind the CLI's backend seam."""
    from dmtools.engine import Engine

    eng = Engine()
    monkeypatch.setattr("dmtools.cli.common.open_backend", lambda args: eng)
    try:
        yield Backend(eng, [])
    finally:
        eng.close()


@pytest.fixture(params=[pytest.param(lf("daemon_cli"), id="daemon"),
                        pytest.param(lf("in_process_cli"), id="in-process")])
def cli(request: pytest.FixtureRequest) -> Backend:
    """The daemon (its own process, working directory ``/``) or an in-process engine."""
    chosen: Backend = request.param
    return chosen


@pytest.fixture
def shadowed(make_image: Callable[..., Path], make_loop: Callable[..., Any], tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A real ``/dev/loopN`` (bytes ``R``) and, in the working directory, a file ``dev/loopN`` (``L``)."""
    real = make_loop(make_image(SIZE, fill=b"R"))
    work = tmp_path / "work"
    (work / "dev").mkdir(parents=True)
    local = work / "dev" / os.path.basename(real.path)
    local.write_bytes(b"L" * SIZE)
    monkeypatch.chdir(work)
    return str(real.path), local


def test_linear_over_a_relative_path_maps_the_callers_file(cli: Backend, shadowed: tuple[str, Path], dm_name: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    real, local = shadowed
    before = _digest(real)
    relative = os.path.relpath(local)
    assert relative.startswith("dev/loop")
    assert cli("dm", "create", dm_name, "--table", f"0 {SIZE // 512} linear {relative} 0") == 0
    try:
        capsys.readouterr()
        cli("dm", "table", dm_name)
        assert str(local) in capsys.readouterr().out  # the file, not /dev/loopN's 7:N
        assert cli.read(dm_name) == b"L" * SIZE
    finally:
        assert cli("dm", "remove", dm_name) == 0
    assert _digest(real) == before


def test_snapshot_cow_given_relative_is_the_callers_file(cli: Backend, shadowed: tuple[str, Path], dm_name: str,
                                                         make_image: Callable[..., Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    real, local = shadowed
    before = _digest(real)
    origin_image = make_image(SIZE, fill=b"O")
    snap = dm_name.replace("-dmtt", "s-dmtt")
    relative = os.path.relpath(local)
    assert cli("dm", "create", dm_name, "--table", f"0 {SIZE // 512} linear {origin_image} 0") == 0
    try:
        assert cli("snapshot", "create", dm_name, "--cow", relative, "--name", snap) == 0
        try:
            capsys.readouterr()
            cli("dm", "table", f"{snap}-cow")
            assert str(local) in capsys.readouterr().out
            with open(local, "rb") as f:
                assert struct.unpack("<I", f.read(4))[0] == SNAP_MAGIC  # the header is here
        finally:
            assert cli("snapshot", "remove", snap) == 0
    finally:
        assert cli("dm", "remove", dm_name) == 0
    assert _digest(real) == before
