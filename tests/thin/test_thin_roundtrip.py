"""Round trips against thin-provisioning-tools: metadata written by thin_restore is read by us, and
metadata we write passes thin_check and dumps (by thin_dump) to exactly what we meant."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from thin_helpers import DeviceModel, PoolModel, random_pool

from dmtools.cli.main import main
from thin.metadata import ThinMetadata, dump_xml
from thin.metadata.check import check
from thin.metadata.restore import restore
from thin.offline import LS_FIELDS, format_ls, ls


def our_dump(path: Path, **kw: object) -> str:
    out = io.StringIO()
    with ThinMetadata.open(path, **kw) as md:  # type: ignore[arg-type]
        dump_xml(md, out)
    return out.getvalue()


POOLS = {
    "empty": PoolModel(),
    "one empty device": PoolModel(devices={0: DeviceModel(0, 0, 0)}),
    "small": random_pool(random.Random(1), devices=3, mappings=40, nr_data_blocks=1000),
    "deep": random_pool(random.Random(2), devices=2, mappings=30000, nr_data_blocks=40000),
    "many devices": random_pool(random.Random(3), devices=300, mappings=3000, nr_data_blocks=5000),
    "wide data": random_pool(random.Random(4), devices=4, mappings=8000, nr_data_blocks=70000),
}


def _xml_and_meta(pool: PoolModel, meta_image: Callable[..., Path], tmp_path: Path) -> tuple[Path, Path]:
    xml = tmp_path / "in.xml"
    xml.write_text(pool.xml())
    return xml, meta_image(64 << 20)


@pytest.mark.parametrize("name", POOLS)
def test_we_read_what_thin_restore_wrote(name: str, thin_tools, meta_image: Callable[..., Path],
                                         tmp_path: Path) -> None:
    pool = POOLS[name]
    xml, meta = _xml_and_meta(pool, meta_image, tmp_path)
    thin_tools.restore(xml, meta)
    theirs = thin_tools.dump(meta)
    assert theirs == pool.xml()
    assert our_dump(meta) == theirs
    report = check(meta)
    assert report.ok, report.errors[:5]
    assert report.mappings == sum(len(d.mappings) for d in pool.devices.values())
    fields = list(LS_FIELDS)
    assert format_ls(ls(meta), fields) == thin_tools.ls(meta, "-o", ",".join(fields))


@pytest.mark.parametrize("name", POOLS)
def test_what_we_restore_passes_thin_check(name: str, thin_tools, meta_image: Callable[..., Path],
                                           tmp_path: Path) -> None:
    pool = POOLS[name]
    xml, meta = _xml_and_meta(pool, meta_image, tmp_path)
    restore(xml, meta)
    thin_tools.check(meta)
    assert thin_tools.dump(meta) == pool.xml()
    assert our_dump(meta) == pool.xml()
    report = check(meta)
    assert report.ok and not report.leaks and not report.warnings, (report.errors[:5], report.leaks[:5], report.warnings)


def test_restore_keeps_version_and_flags(thin_tools, meta_image: Callable[..., Path], tmp_path: Path) -> None:
    pool = random_pool(random.Random(9), devices=2, mappings=20, nr_data_blocks=100)
    pool.version, pool.flags = 1, 1
    xml = tmp_path / "in.xml"
    xml.write_text(pool.xml())
    meta = meta_image()
    restore(xml, meta)
    assert thin_tools.dump(meta) == pool.xml()
    assert check(meta).needs_check
    assert main(["thin", "check", "-q", "--clear-needs-check-flag", str(meta)]) == 0
    pool.flags = 0
    assert thin_tools.dump(meta) == pool.xml()
    thin_tools.check(meta)


def test_restore_accepts_shared_definitions(thin_tools, meta_image: Callable[..., Path], tmp_path: Path) -> None:
    # The Rust tools' shape: runs shared by several devices are defined once and referenced.
    xml = tmp_path / "in.xml"
    xml.write_text('<superblock uuid="" time="1" transaction="2" version="2" data_block_size="128" '
                   'nr_data_blocks="100">\n'
                   '  <def name="7">\n    <range_mapping origin_begin="0" data_begin="10" length="3" time="0"/>\n'
                   '  </def>\n'
                   '  <device dev_id="1" mapped_blocks="4" transaction="0" creation_time="0" snap_time="1">\n'
                   '    <ref name="7"/>\n    <single_mapping origin_block="9" data_block="50" time="1"/>\n'
                   '  </device>\n'
                   '  <device dev_id="2" mapped_blocks="3" transaction="0" creation_time="1" snap_time="1">\n'
                   '    <ref name="7"/>\n  </device>\n</superblock>\n')
    meta = meta_image()
    restore(xml, meta)
    thin_tools.check(meta)
    dump = thin_tools.dump(meta)
    assert dump.count('<range_mapping origin_begin="0" data_begin="10" length="3" time="0"/>') == 2
    assert '<single_mapping origin_block="9" data_block="50" time="1"/>' in dump
