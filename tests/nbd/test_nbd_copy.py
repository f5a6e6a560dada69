"""kcopyd with NBD regions, against servers the tests start: data, holes, errors, dead and hung servers."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

import kcopyd
from dmtools.errors import InvalidArgument
from dmtools.nbd import NbdConnectionError, NbdEndpoint
from dmtools.testing.nbdserver import NbdServer

MiB = 1 << 20
S = 512  # bytes per sector


def _copy(src: object, dests: list[object], nbytes: int, flags: int = 0, **client: object) -> kcopyd.Job:
    client.setdefault("num_pages", 1024)
    with kcopyd.Client(**client) as kc:  # type: ignore[arg-type]
        job = kc.copy(kcopyd.Region(src, 0, nbytes // S), [kcopyd.Region(d, 0, nbytes // S) for d in dests],
                      flags=flags)
        assert job.wait(60)
    return job


def _read(uri: str, nbytes: int) -> bytes:
    buf = bytearray(nbytes)
    with NbdEndpoint(uri) as ep:
        ep.readinto(buf, 0)
    return bytes(buf)


def _sparse_file(path: Path, size: int, data: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, b in data.items():
            f.seek(off)
            f.write(b)


def test_file_to_nbd_and_back(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """Region("nbd+unix:///…?socket=…", 0, n) works as any region, both ways."""
    srv = start_nbdkit(["memory", "32M"])
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(24 * MiB))
    job = _copy(str(src), [srv.uri], 24 * MiB)
    assert job.ok
    assert _read(srv.uri, 24 * MiB) == src.read_bytes()
    with NbdEndpoint(srv.uri, writable=True) as ep:
        assert ep.writes_by_kernel  # plain socket: the file source was sent from its mapping
    back = tmp_path / "back.img"
    back.write_bytes(bytes(24 * MiB))
    job = _copy(srv.uri, [str(back)], 24 * MiB)
    assert job.ok
    assert back.read_bytes() == src.read_bytes()


def test_one_to_two_local_and_nbd(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    srv = start_nbdkit(["memory", "16M"])
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 * MiB))
    local = tmp_path / "local.img"
    local.write_bytes(bytes(16 * MiB))
    job = _copy(str(src), [str(local), srv.uri], 16 * MiB)
    assert (job.read_err, job.write_err) == (False, 0)
    assert local.read_bytes() == src.read_bytes()
    assert _read(srv.uri, 16 * MiB) == src.read_bytes()


def test_nbd_to_nbd_qemu_nbd(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                             start_qemu_nbd: Callable[..., NbdServer]) -> None:
    """qemu-nbd (one connection, -e 1) as the source, nbdkit as the destination."""
    img = tmp_path / "q.img"
    img.write_bytes(os.urandom(8 * MiB))
    q = start_qemu_nbd(img, options=["-r"])
    dst = start_nbdkit(["memory", "8M"])
    job = _copy(q.uri, [dst.uri], 8 * MiB)
    assert job.ok
    assert _read(dst.uri, 8 * MiB) == img.read_bytes()


def test_qemu_nbd_destination(tmp_path: Path, start_qemu_nbd: Callable[..., NbdServer]) -> None:
    img = tmp_path / "q.img"
    img.write_bytes(bytes(8 * MiB))
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    q = start_qemu_nbd(img)
    job = _copy(str(src), [q.uri], 8 * MiB)
    assert job.ok
    q.stop()
    assert img.read_bytes() == src.read_bytes()


def test_file_plugin_destination(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    target = tmp_path / "target.img"
    target.write_bytes(b"\xee" * (8 * MiB))
    srv = start_nbdkit(["file", str(target)])
    src = tmp_path / "src.img"
    _sparse_file(src, 8 * MiB, {MiB: os.urandom(MiB), 5 * MiB: os.urandom(4096)})
    job = _copy(str(src), [srv.uri], 8 * MiB)
    assert job.ok
    assert target.read_bytes() == src.read_bytes()  # holes of the source overwrote 0xee with zeros


def test_holes_written_with_write_zeroes(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """The source's holes become WRITE_ZEROES (no data on the wire); the export stays sparse."""
    log = tmp_path / "log"
    srv = start_nbdkit(["memory", "16M", f"logfile={log}"], filters=["log"])
    src = tmp_path / "src.img"
    _sparse_file(src, 16 * MiB, {2 * MiB: b"\1" * 65536, 9 * MiB: b"\2" * 32768})
    job = _copy(str(src), [srv.uri], 16 * MiB)
    assert job.ok
    text = log.read_text()
    writes = [(int(o, 16), int(c, 16)) for o, c in re.findall(r" Write id=\d+ offset=(0x\w+) count=(0x\w+)", text)]
    zeroes = sum(int(c, 16) for c in re.findall(r" Zero id=\d+ offset=0x\w+ count=(0x\w+)", text))
    assert sorted(writes) == [(2 * MiB, 65536), (9 * MiB, 32768)]  # only the data was sent
    assert zeroes == 16 * MiB - 65536 - 32768
    res = subprocess.run(["nbdinfo", "--map", "--json", srv.uri], capture_output=True, text=True, check=True)
    data = [(e["offset"], e["length"]) for e in json.loads(res.stdout) if not e["type"] & 2]
    assert data == [(2 * MiB, 65536), (9 * MiB, 32768)]
    assert _read(srv.uri, 16 * MiB) == src.read_bytes()


def test_holes_of_nbd_source_skipped(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """BLOCK_STATUS on an NBD source: holes are not read; into a zeroed destination nothing is written there."""
    log = tmp_path / "log"
    srv = start_nbdkit(["memory", "16M", f"logfile={log}"], filters=["log"])
    with NbdEndpoint(srv.uri, writable=True) as ep:
        ep.write(b"\3" * 32768, 4 * MiB)
    dst = tmp_path / "dst.img"
    with open(dst, "wb") as f:
        f.truncate(16 * MiB)
    job = _copy(srv.uri, [str(dst)], 16 * MiB, flags=kcopyd.DEST_ZEROED)
    assert job.ok
    reads = [(int(o, 16), int(c, 16)) for o, c in re.findall(r" Read id=\d+ offset=(0x\w+) count=(0x\w+)", log.read_text())]
    assert reads == [(4 * MiB, 32768)]
    assert dst.read_bytes() == bytes(4 * MiB) + b"\3" * 32768 + bytes(12 * MiB - 32768)
    assert os.stat(dst).st_blocks * 512 <= MiB  # the destination file stayed sparse


def test_write_error_exact_bit(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """The error filter fails every write of destination 1: write_err is exactly 0b10."""
    bad = start_nbdkit(["memory", "8M", "error-pwrite-rate=100%", "error=ENOSPC"], filters=["error"])
    good = start_nbdkit(["memory", "8M"])
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    job = _copy(str(src), [good.uri, bad.uri], 8 * MiB, flags=kcopyd.IGNORE_ERROR)
    assert (job.read_err, job.write_err) == (False, 0b10)
    assert _read(good.uri, 8 * MiB) == src.read_bytes()


def test_read_error(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    srv = start_nbdkit(["memory", "8M", "error-pread-rate=100%"], filters=["error"])
    with NbdEndpoint(srv.uri, writable=True) as ep:
        ep.write(os.urandom(8 * MiB), 0)  # data, so the copy must read it
    dst = tmp_path / "dst.img"
    dst.write_bytes(bytes(8 * MiB))
    job = _copy(srv.uri, [str(dst)], 8 * MiB)
    assert (job.read_err, job.write_err) == (True, 0)


@pytest.mark.parametrize("remote", [False, True], ids=["file", "file+export"])
def test_piece_with_a_failed_read_is_not_written(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                                 remote: bool) -> None:
    """Streamed pieces of four READs, a third of the reads failing at random: read_err, and each
    piece of the destination holds either all its data or none of it (never the reads that
    succeeded beside one that failed). With a second destination (an export) both hold the same
    pieces, and the job's progress counts exactly the pieces written, nothing that was not."""
    srv = start_nbdkit(["memory", "32M", "error-pread-rate=30%", "error=EIO"], filters=["error"])
    data = os.urandom(32 * MiB)
    with NbdEndpoint(srv.uri, writable=True) as ep:
        ep.write(data, 0)
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"\xaa" * (32 * MiB))
    dests: list[object] = [str(dst)]
    if remote:
        other = start_nbdkit(["memory", "32M"])
        with NbdEndpoint(other.uri, writable=True) as ep:
            ep.write(b"\xaa" * (32 * MiB), 0)
        dests.append(other.uri)
    job = _copy(srv.uri, dests, 32 * MiB, num_pages=4096)
    assert job.plan.stream and job.plan.piece_size == 4 * MiB
    assert (job.read_err, job.write_err) == (True, 0)
    got = dst.read_bytes()
    if remote:
        assert _read(other.uri, 32 * MiB) == got
    written = 0
    for off in range(0, 32 * MiB, 4 * MiB):
        piece = got[off : off + 4 * MiB]
        assert piece in (data[off : off + 4 * MiB], b"\xaa" * (4 * MiB)), f"piece at {off} partly written"
        written += 4 * MiB if piece == data[off : off + 4 * MiB] else 0
    assert job.progress.done == written


def test_read_errors_in_one_range_with_ignore(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """IGNORE_ERROR: the failing blocks read as zeros, the rest is copied (error filter + error-file)."""
    trigger = tmp_path / "fail-now"
    srv = start_nbdkit(["memory", "4M", "error-pread-rate=100%", f"error-pread-file={trigger}"], filters=["error"])
    data = os.urandom(4 * MiB)
    with NbdEndpoint(srv.uri, writable=True) as ep:
        ep.write(data, 0)
    trigger.touch()
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"\xaa" * (4 * MiB))
    job = _copy(srv.uri, [str(dst)], 4 * MiB, flags=kcopyd.IGNORE_ERROR)
    assert (job.read_err, job.write_err) == (True, 0)
    assert dst.read_bytes() == bytes(4 * MiB)  # every read failed: zeros, as dm-io's
    trigger.unlink()
    job = _copy(srv.uri, [str(dst)], 4 * MiB)
    assert job.ok and dst.read_bytes() == data


def _kill_mid_copy(job: kcopyd.Job, server: NbdServer, total: int) -> None:
    """Kill ``server`` once ``job`` has done 4 MiB (and not all); the job must end within 10 s."""
    deadline = time.monotonic() + 30
    while job.progress.done < 4 * MiB and time.monotonic() < deadline:
        job.wait(0.01)
    assert 0 < job.progress.done < total
    t0 = time.monotonic()
    server.kill()
    assert job.wait(10), "the copy hung after its server died"
    assert time.monotonic() - t0 < 10


def test_server_killed_mid_copy(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """A destination server that dies mid-copy fails that destination, in bounded time, not a hang."""
    slow = start_nbdkit(["memory", "64M", "wdelay=40ms"], filters=["delay"])
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(64 * MiB))
    local = tmp_path / "local.img"
    local.write_bytes(bytes(64 * MiB))
    with kcopyd.Client(num_pages=1024) as kc:
        job = kc.copy(kcopyd.Region(str(src), 0, 64 * MiB // S),
                      [kcopyd.Region(str(local), 0, 64 * MiB // S), kcopyd.Region(slow.uri, 0, 64 * MiB // S)],
                      flags=kcopyd.IGNORE_ERROR)
        _kill_mid_copy(job, slow, 64 * MiB)
    assert (job.read_err, job.write_err) == (False, 0b10)
    assert local.read_bytes() == src.read_bytes()  # the local destination carried on


def test_source_server_killed_mid_copy(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """A source server that dies mid-copy: read_err, in bounded time; what was written is the
    export's data, and the pump threads are gone once the job is done."""
    slow = start_nbdkit(["memory", "64M", "rdelay=20ms"], filters=["delay"])
    data = os.urandom(64 * MiB)
    with NbdEndpoint(slow.uri, writable=True) as ep:
        ep.write(data, 0)
    dst = tmp_path / "dst.img"
    dst.write_bytes(bytes(64 * MiB))
    with kcopyd.Client(num_pages=1024) as kc:
        job = kc.copy(kcopyd.Region(slow.uri, 0, 64 * MiB // S), [kcopyd.Region(str(dst), 0, 64 * MiB // S)])
        assert job.plan.stream
        _kill_mid_copy(job, slow, 64 * MiB)
    assert (job.read_err, job.write_err) == (True, 0)
    assert not [t for t in threading.enumerate() if t.name.startswith("nbd-pump")]
    got = dst.read_bytes()
    written = [i for i in range(64) if got[i * MiB : (i + 1) * MiB] != bytes(MiB)]
    assert written, "nothing was written before the kill"
    for i in written:  # a piece is written whole, from its own read, or not at all
        assert got[i * MiB : (i + 1) * MiB] == data[i * MiB : (i + 1) * MiB]


def test_hung_server_times_out(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """A server that stops answering: the read fails once the endpoint's timeout passes."""
    srv = start_nbdkit(["memory", "4M", "rdelay=60"], filters=["delay"])
    dst = tmp_path / "dst.img"
    dst.write_bytes(bytes(4 * MiB))
    ep = NbdEndpoint(srv.uri, timeout=1.0)
    try:
        with NbdEndpoint(srv.uri, writable=True) as w:  # data, so that reads are needed
            w.write(b"\1" * (4 * MiB), 0)
        t0 = time.monotonic()
        job = _copy(ep, [str(dst)], 4 * MiB)
        assert time.monotonic() - t0 < 15
        assert (job.read_err, job.write_err) == (True, 0)
    finally:
        ep.close()


def test_read_only_destination_refused(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    srv = start_nbdkit(["memory", "1M"], options=["-r"])
    src = tmp_path / "src.img"
    src.write_bytes(bytes(MiB))
    with kcopyd.Client(num_pages=64) as kc:
        with pytest.raises(InvalidArgument, match="read-only"):
            kc.copy(kcopyd.Region(str(src), 0, 2048), [kcopyd.Region(srv.uri, 0, 2048)])


def test_region_beyond_export_refused(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    srv = start_nbdkit(["memory", "1M"])
    src = tmp_path / "src.img"
    src.write_bytes(bytes(2 * MiB))
    with kcopyd.Client(num_pages=64) as kc:
        with pytest.raises(InvalidArgument, match="beyond the device"):
            kc.copy(kcopyd.Region(str(src), 0, 4096), [kcopyd.Region(srv.uri, 0, 4096)])


def _psk(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    keys = d / "keys.psk"
    keys.write_text(f"alice:{secrets.token_hex(32)}\n")
    keys.chmod(0o600)
    return keys


def test_tls_psk(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """nbds+unix with a PSK: the copy is encrypted; without TLS the server refuses the client."""
    keys = _psk(tmp_path)
    srv = start_nbdkit(["memory", "4M"], options=["--tls=require", f"--tls-psk={keys}"])
    uri = f"nbds+unix://alice@/?socket={srv.socket}&tls-psk-file={keys}"
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(4 * MiB))
    job = _copy(str(src), [uri], 4 * MiB)
    assert job.ok
    assert _read(uri, 4 * MiB) == src.read_bytes()
    with NbdEndpoint(uri, writable=True) as ep:
        assert not ep.writes_by_kernel  # GnuTLS reads the buffer: no mapped source is sent from
    with pytest.raises(NbdConnectionError):
        NbdEndpoint(srv.uri)


def _dmtools(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmtools.cli.main", *args], capture_output=True, text=True)


def test_cli_copy_to_export(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    srv = start_nbdkit(["memory", "8M"])
    src = tmp_path / "vol-snap.img"
    src.write_bytes(os.urandom(8 * MiB))
    res = _dmtools("copy", str(src), srv.uri, "--progress", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["ok"] and summary["destinations"][0]["path"] == srv.uri
    assert _read(srv.uri, 8 * MiB) == src.read_bytes()
    back = tmp_path / "back.img"
    res = _dmtools("copy", srv.uri, str(back), "-q")
    assert res.returncode == 0, res.stderr
    assert back.read_bytes() == src.read_bytes()


def test_cli_errors_one_line(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    ro = start_nbdkit(["memory", "1M"], options=["-r"])
    src = tmp_path / "src.img"
    src.write_bytes(bytes(MiB))
    for args, why in [((str(src), ro.uri), "read-only"),
                      ((str(src), f"nbd+unix:///?socket={tmp_path}/none"), "cannot connect"),
                      ((f"nbd+unix:///?socket={tmp_path}/none", str(tmp_path / "x")), "cannot connect")]:
        res = _dmtools("copy", *args)
        assert res.returncode == 1
        assert why in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "x").exists()  # nothing created for a copy that could not start


def test_overlapping_destinations_on_one_export_refused(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """Two destinations sharing bytes of one export (its identity: the URI) are refused before any I/O."""
    srv = start_nbdkit(["memory", "4M"])
    src = tmp_path / "src.img"
    src.write_bytes(b"\1" * (2 * MiB))
    with kcopyd.Client(num_pages=64) as kc:
        with pytest.raises(InvalidArgument, match="share bytes"):
            kc.copy(kcopyd.Region(str(src), 0, 2048),
                    [kcopyd.Region(srv.uri, 0, 2048), kcopyd.Region(srv.uri, 1024, 2048)])
        job = kc.copy(kcopyd.Region(str(src), 0, 2048),
                      [kcopyd.Region(srv.uri, 0, 2048), kcopyd.Region(srv.uri, 2048, 2048)])
        assert job.wait(30) and job.ok
    assert _read(srv.uri, 2 * MiB) == src.read_bytes()


@pytest.mark.parametrize("num_pages, piece", [(4096, 4 * MiB), (1024, MiB)])
def test_nbd_jobs_take_larger_pieces_when_the_pool_allows(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                                          num_pages: int, piece: int) -> None:
    """A copy with an export moves NBD_PIECE_SIZE pieces when four fit in the pool, both ways."""
    from kcopyd.client import NBD_PIECE_SIZE

    assert NBD_PIECE_SIZE == 4 * MiB
    srv = start_nbdkit(["memory", "16M"])
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(16 * MiB))
    back = tmp_path / "back.img"
    back.write_bytes(bytes(16 * MiB))
    with kcopyd.Client(num_pages=num_pages, sub_job_size=MiB) as kc:
        for s, d in ((str(src), srv.uri), (srv.uri, str(back))):
            job = kc.copy(kcopyd.Region(s, 0, 16 * MiB // S), [kcopyd.Region(d, 0, 16 * MiB // S)])
            assert job.wait(60) and job.ok
            assert job.plan.piece_size == piece
            assert job.plan.stream == (s == srv.uri)  # an export's reads are streamed
        assert kc.pool.peak <= num_pages
    assert back.read_bytes() == src.read_bytes()


def test_copy_command_reads_an_export_on_the_copys_connections(tmp_path: Path,
                                                               start_nbdkit: Callable[..., NbdServer]) -> None:
    """``dmtools copy URI FILE`` opens the export once: its size comes from the connections that
    then carry the copy (no connection of its own), closed at the end. Data checked."""
    from kcopyd.cli import main

    log = tmp_path / "nbdkit.log"
    srv = start_nbdkit(["memory", "8M", f"logfile={log}"], filters=["log"])
    data = os.urandom(8 * MiB)
    with NbdEndpoint(srv.uri, writable=True) as w:
        w.write(data, 0)
        opened = w.connections
    dst = tmp_path / "dst.img"
    assert main([srv.uri, str(dst), "-q"]) == 0
    assert dst.read_bytes() == data
    text = log.read_text()
    connects = re.findall(r"^.* Connect export=", text, re.M)
    # the writer's, then the copy's (one per CPU, at most the writer's): no extra one for the size
    assert len(connects) == opened + min(opened, len(os.sched_getaffinity(0)))
    assert not [t for t in threading.enumerate() if t.name.startswith("nbd-pump")]  # closed


def test_copy_command_sizes_its_client_for_nbd(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``dmtools copy`` with an export: 16 MiB of pages and a worker per 4 MiB piece (4); a copy
    between files keeps 4 MiB and 8 workers; --threads and --num-pages still rule. Data checked."""
    from kcopyd.cli import main

    made: list[tuple[int, int]] = []
    real = kcopyd.Client

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, num_pages: int = 1024, *, threads: int = 8, **kw: object) -> None:
            made.append((num_pages, threads))
            super().__init__(num_pages, threads=threads, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(kcopyd, "Client", Recording)
    srv = start_nbdkit(["memory", "8M"])
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    back, copy = tmp_path / "back.img", tmp_path / "copy.img"
    assert main([str(src), srv.uri, "-q"]) == 0
    assert main([srv.uri, str(back), "-q"]) == 0
    assert main([str(src), str(copy), "-q"]) == 0
    assert main([srv.uri, "null:", "-q", "--threads", "2", "--num-pages", "512"]) == 0
    assert made == [(4096, 4), (4096, 4), (1024, 8), (512, 2)]
    assert back.read_bytes() == copy.read_bytes() == src.read_bytes()
