"""Userspace-engine tables that name NBD exports: linear segments, mirror legs, a snapshot's COW."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import InvalidTable
from dmtools.nbd import NbdEndpoint
from dmtools.testing.nbdserver import NbdServer

MiB = 1 << 20
SIZE = 4 * MiB
SECTORS = SIZE // 512


@pytest.fixture
def eng(engine: Any) -> Any:
    """The plugin's in-process engine."""
    return engine


def _export_bytes(uri: str, size: int = SIZE) -> bytes:
    buf = bytearray(size)
    with NbdEndpoint(uri) as ep:
        assert ep.readinto(buf, 0) == size
    return bytes(buf)


def _device_bytes(eng: Any, name: str, size: int = SIZE) -> bytes:
    buf = bytearray(size)
    with eng.open_endpoint(name, writable=False) as ep:
        assert ep.readinto(buf, 0) == size
    return bytes(buf)


def test_linear_over_two_exports(eng: Any, start_nbdkit: Callable[..., NbdServer]) -> None:
    """A device whose two halves are two exports: writes land in each, the table shows the URIs."""
    a, b = start_nbdkit(["memory", "2M"]), start_nbdkit(["memory", "2M"])
    half = SECTORS // 2
    eng.create("remote-dmtt", f"0 {half} linear {a.uri} 0\n{half} {half} linear {b.uri} 0")
    data = os.urandom(SIZE)
    with eng.open_endpoint("remote-dmtt") as ep:
        ep.write(data, 0)
        ep.flush()
    assert _export_bytes(a.uri, SIZE // 2) == data[: SIZE // 2]
    assert _export_bytes(b.uri, SIZE // 2) == data[SIZE // 2:]
    assert str(eng.table("remote-dmtt")) == f"0 {half} linear {a.uri} 0\n{half} {half} linear {b.uri} 0"


def test_unreachable_or_read_only_export_is_refused(eng: Any, tmp_path: Path,
                                                     start_nbdkit: Callable[..., NbdServer]) -> None:
    with pytest.raises(InvalidTable, match="cannot connect"):
        eng.create("gone-dmtt", f"0 8 linear nbd+unix:///?socket={tmp_path}/none.sock 0")
    ro = start_nbdkit(["memory", "1M"], options=["--readonly"])
    with pytest.raises(InvalidTable, match="read-only"):
        eng.create("ro-dmtt", f"0 8 linear {ro.uri} 0")
    eng.create("ro-dmtt", f"0 8 linear {ro.uri} 0", readonly=True)
    assert [e.name for e in eng.list()] == ["ro-dmtt"]


def test_remote_leg_killed_mid_write_then_repair_brings_a_new_export(
        eng: Any, tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """A mirror with a remote leg whose server dies while a write to it is in flight (held by the
    ``delay`` filter, seen arriving by the ``log`` filter): the leg goes ``D`` (dm-raid1's letter),
    the write completes on the local leg, and `repair` onto a new export leaves the legs identical."""
    from mirror import MirrorManager

    data = os.urandom(SIZE)
    local, remote_img, log = tmp_path / "leg0.img", tmp_path / "leg1.img", tmp_path / "leg1.log"
    local.write_bytes(data)
    remote_img.write_bytes(data)
    remote = start_nbdkit(["file", str(remote_img), f"logfile={log}", "wdelay=60"], filters=["log", "delay"])
    mm = MirrorManager(eng)
    mm.create("rm-dmtt", [str(local), remote.uri], region_size=128, nosync=True, handle_errors=True,
              keep_log=True, monitor=False)
    done: list[BaseException | None] = []

    def write() -> None:
        try:
            with eng.open_endpoint("rm-dmtt") as ep:
                ep.write(b"x" * 4096, 0)
            done.append(None)
        except BaseException as err:  # noqa: BLE001 - reported below
            done.append(err)

    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 60
    while not any(verb == "Write" for _, verb, _ in _requests(log, finished=False)):
        assert time.monotonic() < deadline, "the mirror never sent the write to the remote leg"
        time.sleep(0.01)
    remote.kill()
    writer.join(60)
    assert not writer.is_alive() and done == [None]
    st = mm.status("rm-dmtt")
    assert st.health == "AD"
    fresh = start_nbdkit(["memory", "4M"])
    st = mm.repair("rm-dmtt", 1, fresh.uri)
    assert st.fully_in_sync and st.health == "AA"
    want = local.read_bytes()
    assert want[:4096] == b"x" * 4096
    assert _export_bytes(fresh.uri) == want == _device_bytes(eng, "rm-dmtt")


def test_snapshot_with_a_remote_cow(eng: Any, tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """A snapshot whose COW is an export: the origin changes, the snapshot keeps the old bytes, and the
    COW on the server is a valid persistent store (its header and the copied chunk are there, so
    another host could read the snapshot)."""
    from snapshot import SnapshotManager

    old = os.urandom(SIZE)
    origin = tmp_path / "origin.img"
    origin.write_bytes(old)
    eng.create("base-dmtt", f"0 {SECTORS} linear {origin} 0")
    cow = start_nbdkit(["memory", "2M"])
    sm = SnapshotManager(eng)
    sm.create("base-dmtt", cow.uri, "snap-dmtt")
    new = os.urandom(MiB)
    with eng.open_endpoint("base-dmtt") as ep:
        ep.write(new, 0)
        ep.flush()
    assert _device_bytes(eng, "snap-dmtt") == old
    assert origin.read_bytes()[:MiB] == new
    header = _export_bytes(cow.uri, 4096)
    assert header[:4] == (0x70416E53).to_bytes(4, "little")  # dm-snap-persistent.c SNAP_MAGIC


def _requests(log: Path, *, finished: bool = True) -> list[tuple[str, str, str]]:
    """``(export, request, text)`` per request the server finished successfully, in the order it
    finished them (``finished=False``: per request it started, in the order they arrived)."""
    exports: dict[str, str] = {}
    started: dict[tuple[str, str], tuple[str, str]] = {}
    out = []
    for line in log.read_text().splitlines():
        m = re.search(r"connection=(\d+) (\.\.\.)?(\w+) (?:export=\"?([^\" ]*)\"?|id=(\d+))?(.*)", line)
        if not m:
            continue
        conn, end, verb, export, rid, rest = m.groups()
        if verb == "Connect":
            exports[conn] = export
        elif rid is not None and not end:
            started[(conn, rid)] = (verb, rest)
            if not finished:
                out.append((exports[conn], verb, rest))
        elif rid is not None and finished and "return=0" in rest:
            verb0, args = started.pop((conn, rid))
            out.append((exports[conn], verb0, args))
    return out


def _origin_write_requests(eng: Any, tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                           filters: list[str], args: list[str]) -> tuple[Path, str, list[tuple[str, str, str]]]:
    """A snapshot of an export whose COW is another export of the same nbdkit (``file dir=``, so
    its log orders the requests of both), then one origin write into a fresh chunk: the exports'
    directory, the COW's URI and the requests the server finished for that write."""
    from snapshot import SnapshotManager

    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "origin").write_bytes(os.urandom(SIZE))
    (exports / "cow").write_bytes(bytes(2 * MiB))
    log = tmp_path / "requests.log"
    srv = start_nbdkit(["file", f"dir={exports}", f"logfile={log}", *args], filters=filters)
    origin_uri, cow_uri = (srv.uri.replace(":///?", f":///{name}?") for name in ("origin", "cow"))
    eng.create("base-dmtt", f"0 {SECTORS} linear {origin_uri} 0")
    SnapshotManager(eng).create("base-dmtt", cow_uri, "snap-dmtt")
    mark = len(_requests(log))
    with eng.open_endpoint("base-dmtt") as ep:
        ep.write(b"n" * 4096, 8 * 4096)
    return exports, cow_uri, _requests(log)[mark:]


def test_remote_cow_is_flushed_before_the_origin_write(eng: Any, tmp_path: Path,
                                                        start_nbdkit: Callable[..., NbdServer]) -> None:
    """dm-snap's rule over NBD: the chunk copied to the COW and its exception are on the server and
    flushed before the origin write is sent."""
    exports, _, after = _origin_write_requests(eng, tmp_path, start_nbdkit, ["log"], [])
    first_origin_write = next(i for i, (exp, verb, _) in enumerate(after) if exp == "origin" and verb == "Write")
    before = after[:first_origin_write]
    cow_writes = [i for i, (exp, verb, _) in enumerate(before) if exp == "cow" and verb == "Write"]
    cow_flushes = [i for i, (exp, verb, args) in enumerate(before)
                   if exp == "cow" and (verb == "Flush" or (verb == "Write" and "fua=1" in args))]
    assert len(cow_writes) >= 2, before  # the chunk, then the exception area
    assert cow_flushes and cow_flushes[-1] >= cow_writes[-1], before
    assert (exports / "origin").read_bytes()[8 * 4096: 9 * 4096] == b"n" * 4096


@pytest.mark.parametrize("fuamode", ["pass", "none"])
def test_remote_cow_commit_uses_fua_when_offered_and_flush_otherwise(
        eng: Any, tmp_path: Path, start_nbdkit: Callable[..., NbdServer], fuamode: str) -> None:
    """The exception area is written as the kernel's REQ_PREFLUSH|REQ_FUA: a FLUSH (the copied chunk
    made durable), then the area write with FUA when the server offers it (nbdkit's ``fua`` filter,
    ``fuamode=pass``), or the area write followed by a FLUSH when it does not (``fuamode=none``).
    The ``log`` filter sits in front, so it records what the client sent."""
    # fuamode=none is the filter's default, and the only way to ask for it: nbdkit 1.32.5 refuses
    # the word 'none' ("unknown fuamode").
    mode = [f"fuamode={fuamode}"] if fuamode != "none" else []
    exports, cow_uri, after = _origin_write_requests(eng, tmp_path, start_nbdkit, ["log", "fua"], mode)
    with NbdEndpoint(cow_uri) as probe:
        assert probe.can_fua is (fuamode == "pass") and probe.can_flush
    first_origin_write = next(i for i, (exp, verb, _) in enumerate(after) if exp == "origin" and verb == "Write")
    cow = [(verb, args) for exp, verb, args in after[:first_origin_write] if exp == "cow"]
    writes = [i for i, (verb, _) in enumerate(cow) if verb == "Write"]
    assert len(writes) >= 2, cow  # the chunk, then the exception area
    area = writes[-1]
    assert "Flush" in [verb for verb, _ in cow[writes[0] + 1 : area]], cow  # the chunk is durable first
    if fuamode == "pass":
        assert "fua=1" in cow[area][1] and "Flush" not in [verb for verb, _ in cow[area + 1 :]], cow
    else:
        assert not any("fua=1" in args for _, args in cow), cow
        assert "Flush" in [verb for verb, _ in cow[area + 1 :]], cow
    assert _device_bytes(eng, "snap-dmtt")[8 * 4096 : 9 * 4096] != b"n" * 4096
    assert (exports / "origin").read_bytes()[8 * 4096 : 9 * 4096] == b"n" * 4096


def _no_flush_export(tmp_path: Path, start_nbdkit: Callable[..., NbdServer], name: str) -> NbdServer:
    """A writable export of ``tmp_path/name`` (4 MiB) whose server takes no FLUSH: nbdkit's ``eval``
    plugin, whose ``can_flush`` answers false (exit 3), as nbd-server without ``flush = true``."""
    image = tmp_path / name
    image.write_bytes(bytes(SIZE))
    return start_nbdkit(["eval", f"get_size=echo {SIZE}",
                         f"pread=dd if={image} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
                         f"pwrite=dd of={image} seek=$4 oflag=seek_bytes conv=notrunc status=none",
                         "can_write=exit 0", "can_flush=exit 3"])


def test_an_export_without_flush_is_refused_writable(eng: Any, tmp_path: Path,
                                                     start_nbdkit: Callable[..., NbdServer]) -> None:
    """A COW, a mirror leg or a linear segment mapped writable on a server that takes no FLUSH is
    refused with the reason, and nothing is left: the COW's chunk and exception, the mirror's
    dirty mark, a file system's commit could not be made durable before what depends on them
    (before, the snapshot was made and its 'flushes' were acknowledged by nothing). Read-only
    mapping stays possible."""
    from mirror import MirrorManager
    from snapshot import SnapshotManager

    noflush = _no_flush_export(tmp_path, start_nbdkit, "noflush.img")
    with NbdEndpoint(noflush.uri, writable=True) as probe:
        assert not probe.can_flush and not probe.read_only
    origin = tmp_path / "origin.img"
    origin.write_bytes(os.urandom(SIZE))
    eng.create("base-dmtt", f"0 {SECTORS} linear {origin} 0")
    with pytest.raises(InvalidTable, match="takes no FLUSH"):
        SnapshotManager(eng).create("base-dmtt", noflush.uri, "snap-dmtt")
    assert [e.name for e in eng.list()] == ["base-dmtt"]
    assert str(eng.table("base-dmtt")) == f"0 {SECTORS} linear {origin} 0"
    leg0 = tmp_path / "leg0.img"
    leg0.write_bytes(bytes(SIZE))
    with pytest.raises(InvalidTable, match="takes no FLUSH"):
        MirrorManager(eng).create("m-dmtt", [str(leg0), noflush.uri], region_size=128,
                                  nosync=True, monitor=False)
    with pytest.raises(InvalidTable, match="takes no FLUSH"):
        eng.create("lin-dmtt", f"0 {SECTORS} linear {noflush.uri} 0")
    assert [e.name for e in eng.list()] == ["base-dmtt"]
    eng.create("lin-dmtt", f"0 {SECTORS} linear {noflush.uri} 0", readonly=True)
    assert _device_bytes(eng, "lin-dmtt") == bytes(SIZE)
