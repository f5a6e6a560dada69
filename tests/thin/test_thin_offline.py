"""Offline tools through the CLI: check, dump, restore, ls, export; bad input gives one clear line."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from thin_helpers import build_pool, random_pool, volume_bytes

from dmtools.cli.main import main
from dmtools.errors import CorruptMetadata, DeviceConflict, DeviceNotFound, InvalidArgument
from thin.metadata import ThinMetadata
from thin.offline import export

BS = 128  # sectors: 64 KiB data blocks
BLOCK = BS * 512


@pytest.fixture
def pool(tmp_path: Path, meta_image: Callable[..., Path]) -> tuple[Path, Path, dict[int, dict[int, bytes]]]:
    """A pool with data (``build_pool``) and the expected contents of each volume by block."""
    meta = meta_image(8 << 20)
    data = tmp_path / "dmtt-data.img"
    return meta, data, build_pool(meta, data, block_sectors=BS)


def expected(view: dict[int, bytes], size: int) -> bytes:
    return volume_bytes(view, size, BLOCK)


def test_export_rebuilds_each_volume(pool, tmp_path: Path) -> None:
    meta, data, views = pool
    for dev in (1, 2):
        out = tmp_path / f"vol{dev}.img"
        assert main(["thin", "export", "--metadata", str(meta), "--data", str(data), "--id", str(dev),
                     "-q", str(out)]) == 0
        size = (max(views[dev]) + 1) * BLOCK
        assert out.read_bytes() == expected(views[dev], size)
        # holes stay holes: only mapped blocks take space
        assert os.stat(out).st_blocks * 512 <= (len(views[dev]) + 2) * BLOCK
    again = ["thin", "export", "--metadata", str(meta), "--data", str(data), "--id", "1", "-q", str(out)]
    assert main(again) != 0 and out.read_bytes() == expected(views[2], (max(views[2]) + 1) * BLOCK)  # kept
    assert main([*again, "--force"]) == 0 and out.read_bytes() == expected(views[1], (max(views[1]) + 1) * BLOCK)


def test_export_with_size_cuts_and_pads(pool, tmp_path: Path) -> None:
    meta, data, views = pool
    out = tmp_path / "vol.img"
    out.write_bytes(b"\xff" * (100 * BLOCK))  # an existing file: kept without --force, else none of it survives
    with pytest.raises(InvalidArgument, match=f"exists and holds {100 * BLOCK} bytes; --force overwrites it"):
        export(meta, data, 1, out, size=20 * BLOCK + 4096)
    assert out.read_bytes() == b"\xff" * (100 * BLOCK)
    result = export(meta, data, 1, out, size=20 * BLOCK + 4096, force=True)
    assert result.bytes == 20 * BLOCK + 4096 and result.mapped_blocks == 10
    assert result.output == f"truncated from {100 * BLOCK} to {20 * BLOCK + 4096} bytes"
    assert out.read_bytes() == expected(views[1], 20 * BLOCK + 4096)


@pytest.mark.root
def test_export_onto_a_block_device_zeroes_what_is_unmapped(pool, tmp_path: Path, make_image: Callable[..., Path],
                                                            make_loop: Callable[..., Any]) -> None:
    meta, data, views = pool
    size = (max(views[1]) + 3) * BLOCK  # two unmapped blocks past the last mapped one
    loop = make_loop(make_image(size, fill=b"\xee"))
    with pytest.raises(InvalidArgument, match="is a block device; --force overwrites it"):
        export(meta, data, 1, loop.path)
    result = export(meta, data, 1, loop.path, force=True)  # the volume: the block device's size
    assert result.bytes == size and result.output == f"first {size} bytes of the block device written"
    with open(loop.path, "rb") as f:
        assert f.read() == expected(views[1], size)


def test_export_refuses_aliases_and_missing_devices(pool, tmp_path: Path) -> None:
    meta, data, _views = pool
    before = hashlib.sha256(data.read_bytes()).hexdigest(), hashlib.sha256(meta.read_bytes()).hexdigest()
    with pytest.raises(DeviceConflict):
        export(meta, data, 1, data)
    link = tmp_path / "link"
    link.symlink_to(meta)
    with pytest.raises(DeviceConflict):
        export(meta, data, 1, link)
    with pytest.raises(DeviceNotFound):
        export(meta, data, 7, tmp_path / "nothing.img")
    assert not (tmp_path / "nothing.img").exists()
    after = hashlib.sha256(data.read_bytes()).hexdigest(), hashlib.sha256(meta.read_bytes()).hexdigest()
    assert before == after


def test_export_refuses_a_short_data_device(pool, tmp_path: Path) -> None:
    meta, data, _views = pool
    short = tmp_path / "short.img"
    short.write_bytes(data.read_bytes()[: 5 * BLOCK])
    with pytest.raises(InvalidArgument, match="data device holds"):
        export(meta, short, 1, tmp_path / "out.img")


def test_cli_check_dump_ls(pool, thin_tools, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta, _data, _views = pool
    thin_tools.check(meta)
    assert main(["thin", "check", str(meta)]) == 0
    assert ": ok: transaction 0, 2 devices, 23 mappings" in capsys.readouterr().out
    assert main(["thin", "dump", str(meta)]) == 0
    assert capsys.readouterr().out == thin_tools.dump(meta)
    assert main(["thin", "dump", "--dev-id", "2", "--skip-mappings", str(meta)]) == 0
    assert capsys.readouterr().out == thin_tools.dump(meta, "--dev-id", "2", "--skip-mappings")
    assert main(["thin", "ls", "-o", "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS", str(meta)]) == 0
    assert capsys.readouterr().out == thin_tools.ls(meta, "-o", "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS")
    assert main(["thin", "ls", "--json", str(meta)]) == 0
    rows = json.loads(capsys.readouterr().out)
    # 10 blocks still shared; thin 1 alone keeps its old block 3, the snapshot its new 3 and 50
    assert [(r["dev_id"], r["mapped_blocks"], r["exclusive_blocks"], r["shared_blocks"]) for r in rows] == \
        [(1, 11, 1, 10), (2, 12, 2, 10)]
    with ThinMetadata.open(meta, writable=True) as md:
        held = md.reserve_metadata_snap()
        md.delete(1)
        md.commit()
    assert main(["thin", "dump", "-m", str(meta)]) == 0
    assert capsys.readouterr().out == thin_tools.dump(meta, "-m")
    assert main(["thin", "dump", "--snap-block", str(held), str(meta)]) == 0
    assert capsys.readouterr().out == thin_tools.dump(meta, f"-m{held}")
    assert main(["thin", "ls", "-m", "-o", "DEV,MAPPED_BLOCKS", str(meta)]) == 0
    assert capsys.readouterr().out == thin_tools.ls(meta, "-m", "-o", "DEV,MAPPED_BLOCKS")
    assert main(["thin", "dump", "--json", str(meta)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["superblock"]["time"] == 1 and [d["dev_id"] for d in doc["devices"]] == [2]
    assert doc["devices"][0]["mappings"][0] == {"origin_begin": 0, "data_begin": 0, "length": 3, "time": 0}
    for fmt in ([], ["--json"]):  # --output holds what stdout shows
        assert main(["thin", "dump", *fmt, str(meta)]) == 0
        shown = capsys.readouterr().out
        assert main(["thin", "dump", *fmt, "-o", str(tmp_path / "dump"), str(meta)]) == 0
        assert (tmp_path / "dump").read_text() == shown and capsys.readouterr().out == ""


def test_cli_restore_round_trip(thin_tools, meta_image: Callable[..., Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    model = random_pool(random.Random(11), devices=5, mappings=2000, nr_data_blocks=4000)
    xml = tmp_path / "in.xml"
    xml.write_text(model.xml())
    meta = meta_image()
    assert main(["thin", "restore", "-i", str(xml), "-o", str(meta), "-q"]) == 0
    thin_tools.check(meta)
    assert main(["thin", "dump", str(meta)]) == 0
    assert capsys.readouterr().out == model.xml()
    assert main(["thin", "restore", "-i", str(xml), "-o", str(tmp_path / "missing.img")]) == 1
    assert "does not exist" in capsys.readouterr().err


BAD_XML = {
    "unknown element": ('<superblock uuid="" time="0" transaction="0" data_block_size="128" nr_data_blocks="10">'
                        '<thing/></superblock>', "unsupported element <thing>"),
    "beyond data": ('<superblock uuid="" time="0" transaction="0" data_block_size="128" nr_data_blocks="10">'
                    '<device dev_id="1" mapped_blocks="1" transaction="0" creation_time="0" snap_time="0">'
                    '<single_mapping origin_block="0" data_block="10" time="0"/></device></superblock>',
                    "beyond nr_data_blocks"),
    "wrong count": ('<superblock uuid="" time="0" transaction="0" data_block_size="128" nr_data_blocks="10">'
                    '<device dev_id="1" mapped_blocks="2" transaction="0" creation_time="0" snap_time="0">'
                    '<single_mapping origin_block="0" data_block="1" time="0"/></device></superblock>',
                    "mapped_blocks"),
    "twice": ('<superblock uuid="" time="0" transaction="0" data_block_size="128" nr_data_blocks="10">'
              '<device dev_id="1" mapped_blocks="2" transaction="0" creation_time="0" snap_time="0">'
              '<single_mapping origin_block="4" data_block="1" time="0"/>'
              '<single_mapping origin_block="4" data_block="2" time="0"/></device></superblock>', "twice"),
    "bad block size": ('<superblock uuid="" time="0" transaction="0" data_block_size="100" nr_data_blocks="10">'
                       '</superblock>', "invalid data block size"),
    "truncated": ('<superblock uuid="" time="0" transaction="0" data_block_size="128" nr_data_blocks="10">'
                  '<device dev_id="1"', "not well formed"),
}


@pytest.mark.parametrize("case", BAD_XML)
def test_restore_of_bad_xml_changes_nothing(case: str, pool, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    meta, _data, _views = pool
    text, message = BAD_XML[case]
    xml = tmp_path / "bad.xml"
    xml.write_text(text)
    before = meta.read_bytes()
    assert main(["thin", "restore", "-i", str(xml), "-o", str(meta)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert meta.read_bytes() == before


def _corrupt(meta: Path, block: int, offset: int) -> None:
    with open(meta, "r+b") as f:
        f.seek(block * 4096 + offset)
        byte = f.read(1)
        f.seek(block * 4096 + offset)
        f.write(bytes([byte[0] ^ 0x40]))


def _node_of(meta: Path, what: str) -> int:
    if what.endswith("bitmap"):
        with ThinMetadata.open(meta, writable=True) as md:
            return md.tm.m_bitmaps[0] if what == "metadata bitmap" else md.tm.d_bitmaps[0]
    with ThinMetadata.open(meta) as md:
        if what == "mapping leaf":
            return md.device_root(2)
        if what == "details":
            return md.details_root
        return md.superblock.data_sm.bitmap_root if what == "data index" else \
            md.superblock.metadata_sm.bitmap_root


CORRUPT = {
    "superblock checksum": (lambda m: 0, 400, "bad checksum in superblock"),
    "superblock magic": (lambda m: 0, 32, "bad superblock magic"),
    "mapping node": (lambda m: _node_of(m, "mapping leaf"), 100, "bad checksum in btree node"),
    "details node": (lambda m: _node_of(m, "details"), 40, "bad checksum in btree node"),
    "data space map index": (lambda m: _node_of(m, "data index"), 60, "bad checksum in btree node"),
    "metadata space map index": (lambda m: _node_of(m, "metadata index"), 20,
                                 "bad checksum in metadata space map index"),
    "metadata bitmap": (lambda m: _node_of(m, "metadata bitmap"), 20, "bad checksum in space map bitmap"),
    "data bitmap": (lambda m: _node_of(m, "data bitmap"), 20, "bad checksum in space map bitmap"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_blocks_give_a_clear_error(case: str, pool, thin_tools, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    meta, data, _views = pool
    where, offset, message = CORRUPT[case]
    _corrupt(meta, where(meta), offset)
    before = meta.read_bytes()
    assert thin_tools.run("thin_check", meta, check=False).returncode != 0
    assert main(["thin", "check", str(meta)]) == 1
    assert message in capsys.readouterr().err
    assert main(["--json", "thin", "check", str(meta)]) == 1  # the report on stdout, the errors on stderr
    out = capsys.readouterr()
    assert json.loads(out.out)["ok"] is False
    assert message in out.err and out.err.splitlines()[-1].startswith(f"dmtools: {meta}: ")
    if case.startswith("superblock") or case == "mapping node" or case == "details node":
        assert main(["thin", "dump", str(meta)]) == 1
        out = capsys.readouterr()
        assert message in out.err and out.err.count("\n") == 1
    if case == "details node":  # export needs only the mapping trees: recovery still works
        assert export(meta, data, 2, tmp_path / "vol.img").mapped_blocks == 12
    elif case in ("mapping node", "superblock checksum", "superblock magic"):
        with pytest.raises(CorruptMetadata, match=message):
            export(meta, data, 2, tmp_path / "vol.img")
    with pytest.raises(CorruptMetadata, match=message):
        ThinMetadata.open(meta, writable=True).close() if case not in ("mapping node", "details node") else \
            _touch_all(meta)
    assert meta.read_bytes() == before


def _touch_all(meta: Path) -> None:
    with ThinMetadata.open(meta, writable=True) as md:
        for dev in md.devices():
            list(md.mappings(dev))


def test_live_pool_metadata_is_not_rewritten_offline(engine: Any, tmp_path: Path, thin_tools,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """What writes metadata offline (``thin restore``; ``ThinMetadata.open(writable=True)``, which
    ``thin check --clear-needs-check-flag`` uses) refuses a live pool's metadata (the engine holds
    its file, as the kernel holds a tmeta device) with DeviceBusy before a byte is written, as
    thin-provisioning-tools' ``O_EXCL`` open refuses it on the kernel; once the pool is gone both
    go through."""
    from target_rig import PoolRig

    from dmtools.errors import DeviceBusy

    rig = PoolRig(engine, tmp_path)
    rig.message("create_thin 1")
    engine.suspend(rig.name)  # commits; nothing changes the metadata until the resume
    model = random_pool(random.Random(3), devices=2, mappings=50, nr_data_blocks=64)
    xml = tmp_path / "in.xml"
    xml.write_text(model.xml())
    before = rig.meta.read_bytes()
    assert main(["thin", "restore", "-i", str(xml), "-o", str(rig.meta)]) == 1
    err = capsys.readouterr().err
    assert "is claimed by another engine or tool" in err and err.count("\n") == 1, err
    with pytest.raises(DeviceBusy):
        ThinMetadata.open(rig.meta, writable=True)
    assert rig.meta.read_bytes() == before
    engine.resume(rig.name)
    rig.close()
    with ThinMetadata.open(rig.meta, writable=True) as md:  # the pool's, intact
        assert set(md.devices()) == {1}
    assert main(["thin", "restore", "-q", "-i", str(xml), "-o", str(rig.meta)]) == 0
    thin_tools.check(rig.meta)


def test_dump_output_that_is_an_input_or_in_use_is_refused(pool, engine: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``thin dump -o`` truncates its output: the metadata itself under any spelling (the path, a
    symlink, a hard link, a relative path) is refused before it is opened, and so is a file a live
    table holds (the in-process engine's claim); the bytes stay as they were."""
    meta, data, _views = pool
    (tmp_path / "link").symlink_to(meta)
    (tmp_path / "hard").hardlink_to(meta)
    monkeypatch.chdir(meta.parent)
    before = meta.read_bytes(), data.read_bytes()
    engine.create("user", f"0 {len(before[1]) // 512} linear {data} 0")
    for out in (meta, tmp_path / "link", tmp_path / "hard", Path(meta.name), data):
        assert main(["thin", "dump", str(meta), "-o", str(out)]) == 1
        err = capsys.readouterr().err
        assert ("same bytes" in err if out != data else "claimed" in err) and err.count("\n") == 1, (out, err)
        assert (meta.read_bytes(), data.read_bytes()) == before, out
    engine.remove("user")
    assert main(["thin", "dump", str(meta), "-o", str(tmp_path / "out.xml")]) == 0
    assert main(["thin", "dump", str(meta)]) == 0
    assert capsys.readouterr().out == (tmp_path / "out.xml").read_text()


@pytest.mark.root
def test_export_whose_data_device_fails_removes_the_file_it_made(pool, exposed_engine: Any, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The data device fails reads past its first 256 KiB (an ``error`` target of an engine's exposed
    device): the export exits 1 naming the blocks it could not copy, and the output file it
    created is gone, not left as a whole-sized image with holes where the data was."""
    meta, data, _views = pool
    exposed_engine.create("bad-dmtt", f"0 512 linear {data} 0\n512 {64 * BS - 512} error")
    out = tmp_path / "vol.img"
    argv = ["thin", "export", "--metadata", str(meta), "--data", exposed_engine.device_path("bad-dmtt"), "--id", "1"]
    assert main([*argv, str(out)]) == 1
    err = capsys.readouterr().err
    assert "copying blocks 0..9 failed (read_err=1" in err and err.count("\n") == 1, err
    assert not out.exists()
    out.write_bytes(b"\x33" * 4096)  # a file that was there before stays (rewritten, as --force said)
    assert main([*argv, "--force", str(out)]) == 1
    assert out.exists()
    exposed_engine.remove("bad-dmtt")
