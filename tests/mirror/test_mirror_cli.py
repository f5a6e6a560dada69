"""``dmtools mirror`` actions, run in-process on the userspace engine."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import CorruptMetadata, DMError, InvalidArgument
from dmtools.testing.memory import MemoryEndpoint
from mirror import cli
from mirror.format import LogImage, format_log
from mirror.manager import MirrorManager

MB = 1 << 20


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="userspace")
    parser.add_argument("--json", action="store_true")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    data = os.urandom(2 * MB)
    for name in ("a", "b", "c"):
        p = tmp_path / name
        p.write_bytes(data if name == "a" else bytes(2 * MB))
        out[name] = str(p)
    log = tmp_path / "log"
    log.write_bytes(bytes(64 * 1024))
    out["log"] = str(log)
    return out


@pytest.fixture
def use_engine(engine: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(cli, "_manager", lambda args: MirrorManager(engine))
    return engine


def test_inspect_json(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with open(files["log"], "r+b") as f:
        img = LogImage.new(32, in_sync=True)
        img.clean.clear(7)
        f.write(img.pack())
    assert run(["--json", "mirror", "inspect", files["log"], "--region-size", "64K"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["nr_regions"] == 32 and data["out_of_sync_ranges"] == [[7, 7]]
    assert data["region_size_sectors"] == 128


def test_inspect_errors(files: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(CorruptMetadata):
        run(["mirror", "inspect", files["log"]])
    tiny = tmp_path / "tiny"
    tiny.write_bytes(bytes(600))
    with pytest.raises(InvalidArgument, match="too small"):
        run(["mirror", "inspect", str(tiny)])
    with pytest.raises(InvalidArgument, match="power of two"):
        run(["mirror", "inspect", files["log"], "--region-size", "3"])


def test_resync_offline_with_progress_fd(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    ep = MemoryEndpoint(64 * 1024, "log")
    format_log(ep, 32, in_sync=False)
    Path(files["log"]).write_bytes(bytes(ep.data))
    r, w = os.pipe()
    try:
        rc = run(["--json", "mirror", "resync-offline", files["a"], files["b"], "--log", files["log"],
                  "--region-size", "64K", f"--progress={w}"])
        os.close(w)
        lines = os.read(r, 65536).decode().split()
    finally:
        os.close(r)
    assert rc == 0 and lines[-1] == "100/100"
    assert json.loads(capsys.readouterr().out)["regions_copied"] == 32
    assert Path(files["a"]).read_bytes() == Path(files["b"]).read_bytes()


def test_create_status_resync_split_remove(files: dict[str, str], use_engine: Any,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["mirror", "create", "cm", files["a"], files["b"], "--log", files["log"], "--region-size", "64K"]) == 0
    assert run(["mirror", "resync", "cm", "--rate", "64M", "--quiet"]) == 0
    capsys.readouterr()
    assert run(["--json", "mirror", "status"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["name"] == "cm" and data[0]["percent_in_sync"] == 100.0
    assert data[0]["log"] == {"type": "disk", "device": files["log"], "health": "A"}
    assert run(["mirror", "split", "cm", "1", "cm-b"]) == 0
    assert run(["mirror", "add-leg", "cm", files["c"], "--region-size", "64K", "-q"]) == 0
    assert Path(files["c"]).read_bytes() == Path(files["a"]).read_bytes()
    assert run(["mirror", "remove", "cm"]) == 0
    assert not use_engine.exists("cm")


def test_create_rejects_bad_region_size(files: dict[str, str], use_engine: Any) -> None:
    # read by dmtools.units.parse_sectors, as every other size in sectors of the CLI
    with pytest.raises(InvalidArgument, match=r"'3000b' \(3000 bytes\) is not a multiple of 512 bytes"):
        run(["mirror", "create", "bad", files["a"], files["b"], "--region-size", "3000b"])
    assert not use_engine.exists("bad")


@pytest.mark.parametrize("verb", ["resync", "repair", "add-leg", "resync-offline"])
def test_an_empty_rate_is_refused_not_taken_as_no_limit(files: dict[str, str], use_engine: Any, verb: str) -> None:
    assert run(["mirror", "create", "cm", files["a"], files["b"], "--region-size", "64K", "--nosync"]) == 0
    argv = {"resync": ["cm"], "repair": ["cm", "1", files["c"]], "add-leg": ["cm", files["c"]],
            "resync-offline": [files["c"], files["log"], "--log", "core"]}[verb]
    before = {n: Path(p).read_bytes() for n, p in files.items()}, str(use_engine.table("cm"))
    with pytest.raises(InvalidArgument, match="empty size"):
        run(["mirror", verb, *argv, "--rate", "", "--quiet"])
    assert ({n: Path(p).read_bytes() for n, p in files.items()}, str(use_engine.table("cm"))) == before


@pytest.mark.parametrize("log, name, error", [("core", "vol", "needs a disk log"), ("disk", "bad/name", "contains '/'"),
                                              ("disk", "taken", "already exists"), ("disk", "x" * 200, "at most 127")],
                         ids=["core-log", "slash", "exists", "too-long"])
def test_resync_offline_refuses_a_bad_activation_before_copying(files: dict[str, str], use_engine: Any, log: str,
                                                                name: str, error: str) -> None:
    ep = MemoryEndpoint(64 * 1024, "log")
    format_log(ep, 32, in_sync=False)
    Path(files["log"]).write_bytes(bytes(ep.data))
    use_engine.create("taken", "0 8 zero")
    before = {n: Path(p).read_bytes() for n, p in files.items()}
    with pytest.raises(DMError, match=error):
        run(["mirror", "resync-offline", files["a"], files["b"], "--log", files["log"] if log == "disk" else "core",
             "--region-size", "64K", "--activate", name, "-q"])
    assert {n: Path(p).read_bytes() for n, p in files.items()} == before  # nothing copied, the log untouched
    assert [e.name for e in use_engine.list()] == ["taken"]


@pytest.mark.parametrize("extra", [[], ["--no-monitor"]])
def test_create_refuses_a_spare_it_would_not_use(files: dict[str, str], use_engine: Any, extra: list[str]) -> None:
    # the userspace engine's guard takes no spare: refused, not silently ignored
    with pytest.raises(InvalidArgument, match="--spare is for the monitor of a kernel mirror"):
        run(["mirror", "create", "cm", files["a"], files["b"], "--spare", files["c"], *extra])
    assert not use_engine.exists("cm")
