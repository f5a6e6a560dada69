"""``dmtools snapshot ...`` through its argparse registration (backend: the in-process engine)."""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import CorruptMetadata, DeviceNotFound, InvalidArgument
from snapshot.cli import register

SIZE = 256 * 1024


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dmtools")
    parser.add_argument("--backend", default="userspace")
    parser.add_argument("--json", action="store_true")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def env(engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Path, bytes]:
    monkeypatch.setattr("dmtools.cli.common.open_backend", lambda args: engine)
    data = random.Random(9).randbytes(SIZE)
    (tmp_path / "vol.img").write_bytes(data)
    engine.create("vol", f"0 {SIZE // 512} linear {tmp_path / 'vol.img'} 0")
    with open(tmp_path / "s.cow", "wb") as f:
        f.truncate(SIZE)
    return engine, tmp_path, data


def test_create_list_merge_remove(env: tuple[Any, Path, bytes], capsys: pytest.CaptureFixture[str]) -> None:
    eng, tmp, data = env
    assert run(["snapshot", "create", "vol", "--cow", str(tmp / "s.cow"), "--name", "s", "--chunk-size", "8K"]) == 0
    assert "created snapshot s of vol (32/512 32)" in capsys.readouterr().out
    with eng.open_endpoint("vol") as ep:
        ep.write(b"z" * 8192, 0)
    assert run(["--json", "snapshot", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["name"] == "s" and listed[0]["status"] == "48/512 32" and listed[0]["chunk_size"] == 16
    r, w = os.pipe()
    try:
        assert run(["snapshot", "merge", "s", f"--progress={w}"]) == 0
        os.close(w)
        lines = os.read(r, 4096).decode().split()
    finally:
        os.close(r)
    assert lines[-1] == "100/100"
    assert "merged s" in capsys.readouterr().out
    buf = bytearray(SIZE)
    with eng.open_endpoint("vol", writable=False) as ep:
        ep.readinto(buf, 0)
    assert bytes(buf) == data
    assert run(["snapshot", "create", "vol", "--cow", str(tmp / "s.cow"), "--name", "s2", "--transient"]) == 0
    assert run(["snapshot", "status", "s2"]) == 0
    assert "store: N" in capsys.readouterr().out
    assert run(["snapshot", "remove", "s2"]) == 0
    assert sorted(e.name for e in eng.list()) == ["vol"]


@pytest.mark.parametrize(("size", "message"), [("100b", "not a multiple of 512"), ("0", "Chunk size not set"),
                                                ("12", "not a power of 2"), ("4KB", "ambiguous unit")])
def test_create_refuses_a_bad_chunk_size(env: tuple[Any, Path, bytes], size: str, message: str) -> None:
    """``--chunk-size`` is read as every size in sectors is (``dmtools.units.parse_sectors``), then
    checked as the kernel does; nothing is created or written."""
    eng, tmp, _ = env
    cow = (tmp / "s.cow").read_bytes()
    with pytest.raises(InvalidArgument, match=message):
        run(["snapshot", "create", "vol", "--cow", str(tmp / "s.cow"), "--name", "s", "--chunk-size", size])
    assert [e.name for e in eng.list()] == ["vol"] and (tmp / "s.cow").read_bytes() == cow


def test_refresh_takes_up_a_grown_cow(env: tuple[Any, Path, bytes], capsys: pytest.CaptureFixture[str]) -> None:
    eng, tmp, data = env
    assert run(["snapshot", "create", "vol", "--cow", str(tmp / "s.cow"), "--name", "s"]) == 0
    with eng.open_endpoint("vol") as ep:
        ep.write(b"y" * 4096, 8192)
    capsys.readouterr()
    os.truncate(tmp / "s.cow", 2 * SIZE)
    assert run(["--json", "snapshot", "refresh", "s"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"] == f"24/{2 * SIZE // 512} 16"  # same exceptions, twice the space
    buf = bytearray(8192)
    with eng.open_endpoint("s") as ep:
        ep.readinto(buf, 8192)
    assert bytes(buf) == data[8192:16384]  # the exception survived the handover
    tables = {n: str(eng.table(n)) for n in ("vol", "s", "s-cow")}
    with pytest.raises(DeviceNotFound):
        run(["snapshot", "refresh", "nosuch"])
    assert {n: str(eng.table(n)) for n in tables} == tables


def test_inspect_and_export(env: tuple[Any, Path, bytes], capsys: pytest.CaptureFixture[str]) -> None:
    eng, tmp, data = env
    run(["snapshot", "create", "vol", "--cow", str(tmp / "s.cow"), "--name", "s"])
    with eng.open_endpoint("vol") as ep:
        ep.write(b"q" * 4096, 4096)
    capsys.readouterr()
    assert run(["--json", "snapshot", "inspect", str(tmp / "s.cow")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["valid"] and info["exceptions"] == 1 and info["status"] == "24/512 16"
    assert run(["snapshot", "export", "--origin", str(tmp / "vol.img"), "--cow", str(tmp / "s.cow"), str(tmp / "out.img")]) == 0
    assert (tmp / "out.img").read_bytes() == data
    assert "1 exceptions" in capsys.readouterr().out


def test_inspect_corrupt(tmp_path: Path) -> None:
    (tmp_path / "bad.cow").write_bytes(b"nonsense" * 1024)
    with pytest.raises(CorruptMetadata, match="Invalid or corrupt snapshot"):
        run(["snapshot", "inspect", str(tmp_path / "bad.cow")])
