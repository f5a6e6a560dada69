"""Unit tier: fastio.c's snapshot-origin maps (``dmf_slot_set_origin``), driven through
``dmf_slot_write``/``dmf_slot_read`` as its FUSE entries drive them: requests pass onto the lower
slot's map at the same offsets, reads always, writes only over granules the chunk set holds; the
lower map withdrawn (a suspend), a read-only origin or an emptied set send them to Python."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmtools._ffi import fastio
from dmtools.engine import Engine
from dmtools.engine.fastpath import describe
from dmtools.engine.passthrough import GRANULE, WriteThrough

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture
def origin(lib: fastio.FastIO, ctx: int, engine: Engine, tmp_path: Path) -> Iterator[tuple[int, int, WriteThrough, Path]]:
    """``(origin slot, lower slot, chunk set, lower's image)``."""
    img = tmp_path / "real.img"
    img.write_bytes(os.urandom(SIZE))
    engine.create("fpo-real", f"0 {SIZE // 512} linear {img} 0")
    words = describe(engine._get("fpo-real", "test").live)  # type: ignore[arg-type]
    assert words is not None
    lower = lib.slot_new(ctx)
    lib.slot_set(ctx, lower, words)
    writes = WriteThrough(lib, SIZE)
    slot = lib.slot_new(ctx)
    with writes.held() as chunks:
        lib.slot_set_origin(ctx, slot, SIZE, False, chunks, lower)
    yield slot, lower, writes, img
    writes.close()


def test_reads_pass_on_and_writes_only_where_marked(lib, ctx, origin):
    slot, _, writes, img = origin
    data = img.read_bytes()
    buf = bytearray(MiB)
    assert lib.slot_read(ctx, slot, buf, MiB) == MiB and bytes(buf) == data[MiB : 2 * MiB]
    new = os.urandom(64 << 10)
    assert lib.slot_write(ctx, slot, new, MiB) is None  # not marked: Python copies first
    assert img.read_bytes() == data
    writes.mark(MiB, 32 << 10)
    assert lib.slot_write(ctx, slot, new, MiB) is None  # half of it is not marked
    writes.mark(MiB + (32 << 10), 32 << 10)
    assert lib.slot_write(ctx, slot, new, MiB) == len(new)
    assert img.read_bytes()[MiB : MiB + len(new)] == new
    assert lib.slot_write(ctx, slot, new[:512], MiB + GRANULE + 512) == 512  # inside a granule
    stats = lib.slot_stats(ctx, slot)
    assert stats["writes"] == 2 and stats["fallbacks"] == 2 and stats["reads"] == 1
    writes.clear()
    assert lib.slot_write(ctx, slot, new, MiB) is None


def test_a_withdrawn_lower_map_or_a_read_only_origin_goes_to_python(lib, ctx, origin):
    slot, lower, writes, _ = origin
    writes.mark(0, SIZE)
    assert lib.slot_write(ctx, slot, b"\1" * 4096, 0) == 4096
    lib.slot_set(ctx, lower, None)  # the -real device suspended
    assert lib.slot_write(ctx, slot, b"\1" * 4096, 0) is None
    assert lib.slot_read(ctx, slot, bytearray(4096), 0) is None
    other = lib.slot_new(ctx)
    with writes.held() as chunks:
        lib.slot_set_origin(ctx, other, SIZE, True, chunks, lower)
        with pytest.raises(OSError):
            lib.slot_set_origin(ctx, other, SIZE, True, chunks, other)  # onto itself
    assert lib.slot_write(ctx, other, b"\1" * 4096, 0) is None


def test_the_map_keeps_the_set_after_its_owner_closed_it(lib, ctx, origin):
    slot, _, writes, img = origin
    writes.mark(0, MiB)
    writes.close()
    writes.mark(MiB, MiB)  # closed: nothing
    assert lib.slot_write(ctx, slot, b"\2" * 4096, 0) == 4096
    assert lib.slot_write(ctx, slot, b"\2" * 4096, MiB) is None
    assert img.read_bytes()[:4096] == b"\2" * 4096
    lib.slot_set(ctx, slot, None)  # the map's reference goes with it
