"""``dmtools.output.open_output``: the output of ``snapshot export`` and ``thin export``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.claims import Holder
from dmtools.errors import DeviceBusy, InvalidArgument
from dmtools.output import open_output

KiB = 1024


@pytest.fixture
def holder() -> Iterator[Holder]:
    h = Holder("test export")
    try:
        yield h
    finally:
        h.close()


def test_a_new_file_is_created_at_the_size(tmp_path: Path, holder: Holder) -> None:
    out = tmp_path / "out.img"
    dev, size, is_blk, action = open_output(out, None, 64 * KiB, force=False, holder=holder)
    dev.close()
    assert (size, is_blk, action) == (64 * KiB, False, f"created with {64 * KiB} bytes")
    assert out.stat().st_size == 64 * KiB and out.stat().st_blocks == 0  # one hole


def test_an_empty_file_is_taken_without_force(tmp_path: Path, holder: Holder) -> None:
    out = tmp_path / "out.img"
    out.touch()
    dev, size, _, action = open_output(out, 8 * KiB, 4 * KiB, force=False, holder=holder)
    dev.close()
    assert size == 8 * KiB and action == f"sized from 0 to {8 * KiB} bytes" and out.stat().st_size == 8 * KiB


@pytest.mark.parametrize(("before", "how"), [(96 * KiB, "truncated"), (16 * KiB, "extended")])
def test_a_file_holding_data_needs_force_then_starts_over(tmp_path: Path, holder: Holder, before: int,
                                                          how: str) -> None:
    out = tmp_path / "out.img"
    out.write_bytes(b"\xff" * before)
    with pytest.raises(InvalidArgument, match=f"exists and holds {before} bytes; --force overwrites it"):
        open_output(out, 32 * KiB, 32 * KiB, force=False, holder=holder)
    assert out.read_bytes() == b"\xff" * before  # refused: untouched
    dev, size, _, action = open_output(out, 32 * KiB, 32 * KiB, force=True, holder=holder)
    dev.close()
    assert action == f"{how} from {before} to {32 * KiB} bytes"
    assert out.read_bytes() == bytes(32 * KiB)  # no old byte survives: what the export skips reads as zeros


def test_neither_file_nor_block_device_is_refused(tmp_path: Path, holder: Holder) -> None:
    with pytest.raises(InvalidArgument, match="regular file or a block device"):
        open_output(tmp_path, 4 * KiB, 4 * KiB, force=True, holder=holder)
    with pytest.raises(InvalidArgument, match="regular file or a block device"):
        open_output("/dev/null", 4 * KiB, 4 * KiB, force=True, holder=holder)


def test_an_output_claimed_elsewhere_is_refused(tmp_path: Path, holder: Holder) -> None:
    out = tmp_path / "out.img"
    out.write_bytes(b"\x11" * 4 * KiB)
    other = Holder("another tool")
    try:
        other.claim(str(out))
        with pytest.raises(DeviceBusy):
            open_output(out, 4 * KiB, 4 * KiB, force=True, holder=holder)
    finally:
        other.close()
    assert out.read_bytes() == b"\x11" * 4 * KiB


@pytest.mark.root
def test_a_block_device_needs_force_and_room(make_image: Callable[..., Path], make_loop: Callable[..., Any],
                                             holder: Holder) -> None:
    loop = make_loop(make_image(64 * KiB, fill=b"\x22"))
    with pytest.raises(InvalidArgument, match="is a block device; --force overwrites it"):
        open_output(loop.path, None, 4 * KiB, force=False, holder=holder)
    small = Holder("a larger export")
    try:
        with pytest.raises(InvalidArgument, match=f"output holds {64 * KiB} bytes, the export needs {128 * KiB}"):
            open_output(loop.path, None, 128 * KiB, force=True, holder=small)
    finally:
        small.close()
    dev, size, is_blk, action = open_output(loop.path, 16 * KiB, 4 * KiB, force=True, holder=holder)
    try:
        assert (size, is_blk) == (16 * KiB, True)
        assert action == f"first {16 * KiB} bytes of the block device written, its last {48 * KiB} bytes left as " \
                         "they were"
        with pytest.raises(OSError):  # claimed: exclusive against any other opener
            os.close(os.open(loop.path, os.O_RDONLY | os.O_EXCL))
    finally:
        dev.close()
