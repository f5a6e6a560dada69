"""Unit tier: the exposure's C data path (``dmtools/_ffi/fastio.c``) on maps of real engine tables
over image files, against the Python targets that it stands in for (no FUSE: its slots are
driven through ``dmf_slot_write``/``dmf_slot_read``, the functions its FUSE entries call)."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from dmtools._ffi import fastio
from dmtools.engine import Engine
from dmtools.engine.fastpath import describe

MiB = 1 << 20


def _images(tmp_path: Path, *sizes: int) -> list[str]:
    out = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"fp{i}.img"
        path.write_bytes(os.urandom(size))
        out.append(str(path))
    return out


def _mapped(lib: fastio.FastIO, ctx: int, engine: Engine, name: str) -> int:
    words = describe(engine._get(name, "test").live)  # type: ignore[arg-type]
    assert words is not None
    slot = lib.slot_new(ctx)
    assert slot
    lib.slot_set(ctx, slot, words)
    return slot


def _python_read(engine: Engine, name: str, size: int, offset: int) -> bytes:
    buf = bytearray(size)
    with engine.open_endpoint(name, writable=False) as ep:
        assert ep.readinto(buf, offset) == size
    return bytes(buf)


@pytest.mark.parametrize("table", ["linear", "striped", "mixed"])
def test_c_reads_and_writes_match_the_python_targets(lib, ctx, engine, tmp_path, table):
    a, b, c = _images(tmp_path, 8 * MiB, 8 * MiB, 8 * MiB)
    tables = {
        "linear": f"0 16384 linear {a} 0",
        # three stripes of 20 KiB chunks from odd offsets, so pieces cross chunks everywhere
        "striped": f"0 12000 striped 3 40 {a} 8 {b} 16 {c} 1000",
        # segments of both kinds back to back, one of them two-stripe
        "mixed": f"0 1000 linear {b} 24\n1000 4096 striped 2 8 {a} 0 {c} 4096\n5096 3000 linear {a} 9000",
    }
    engine.create("fp-t", tables[table])
    size = engine._get("fp-t", "test").size
    slot = _mapped(lib, ctx, engine, "fp-t")
    rng = random.Random(table)
    for _ in range(120):
        n = rng.choice([512, 4096, 65536, 300_000, MiB]) + rng.choice([0, 0, 512, 4096 + 512])
        n = min(n, size)
        off = rng.randrange(0, (size - n) // 512 + 1) * 512
        if rng.random() < 0.5:
            data = os.urandom(n)
            assert lib.slot_write(ctx, slot, bytearray(data), off) == n
            assert _python_read(engine, "fp-t", n, off) == data
        else:
            data = os.urandom(n)
            with engine.open_endpoint("fp-t") as ep:
                ep.write(data, off)
            got = bytearray(n)
            assert lib.slot_read(ctx, slot, got, off) == n
            assert bytes(got) == data
    stats = lib.slot_stats(ctx, slot)
    assert stats["reads"] + stats["writes"] == 120 and stats["fallbacks"] == stats["errors"] == 0


def test_requests_the_map_does_not_cover_go_to_python(lib, ctx, engine, tmp_path):
    (a,) = _images(tmp_path, 4 * MiB)
    engine.create("fp-ro", f"0 8192 linear {a} 0", readonly=True)
    slot = _mapped(lib, ctx, engine, "fp-ro")
    buf = bytearray(8192)
    assert lib.slot_read(ctx, slot, buf, 0) == 8192
    assert lib.slot_write(ctx, slot, buf, 0) is None  # read-only: Python says EROFS
    assert lib.slot_read(ctx, slot, buf, 4 * MiB - 4096) is None  # crosses the end
    assert lib.slot_read(ctx, slot, bytearray(0), 0) is None
    assert lib.slot_stats(ctx, slot)["fallbacks"] == 3
    lib.slot_set(ctx, slot, None)  # withdrawn: everything goes to Python
    assert lib.slot_read(ctx, slot, buf, 0) is None
    lib.slot_free(ctx, slot)
    assert lib.slot_read(ctx, slot, buf, 0) is None and lib.slot_stats(ctx, slot) == {}
    with pytest.raises(OSError) as exc:
        lib.slot_set(ctx, slot, describe(engine._get("fp-ro", "test").live))  # type: ignore[arg-type]
    assert exc.value.errno == errno.ENOENT


def test_slot_ids_are_never_reused(lib, ctx):
    seen = set()
    for _ in range(3000):  # more than the slots there are
        slot = lib.slot_new(ctx)
        assert slot and slot not in seen
        seen.add(slot)
        lib.slot_free(ctx, slot)


def test_a_failing_backing_read_is_left_to_python(lib, ctx, engine, tmp_path):
    (a,) = _images(tmp_path, 4 * MiB)
    engine.create("fp-short", f"0 8192 linear {a} 0")
    slot = _mapped(lib, ctx, engine, "fp-short")
    os.truncate(a, MiB)  # the file shrank under the table: reads past it are short
    buf = bytearray(8192)
    assert lib.slot_read(ctx, slot, buf, 2 * MiB) is None
    assert lib.slot_stats(ctx, slot)["errors"] == 1


@pytest.mark.parametrize("words", [
    [MiB, 0, 0, 0, 1, 0, MiB, 0, 1, -5, -5, -1, 512, 0],  # a negative descriptor
    [MiB, 0, 0, 0, 1, 0, MiB // 2, 0, 1, 0, 0, -1, 512, 0],  # segments short of the size
    [MiB, 0, 0, 0, 1, 0, MiB, 0, 2, 0, 0, -1, 512, 0, 0, 0, -1, 512, 0],  # 2 legs, no chunk
    [MiB, 0, 0, 0, 2, 0, MiB, 0, 1, 0, 0, -1, 512, 0],  # one segment of two
])
def test_malformed_maps_are_refused(lib, ctx, words):
    slot = lib.slot_new(ctx)
    with pytest.raises(OSError) as exc:
        lib.slot_set(ctx, slot, words)
    assert exc.value.errno in (errno.EINVAL, errno.EBADF)
    assert lib.slot_read(ctx, slot, bytearray(512), 0) is None


def test_only_linear_and_striped_over_files_get_a_map(engine, tmp_path):
    (a,) = _images(tmp_path, 4 * MiB)
    engine.create("fp-mix", f"0 4096 linear {a} 0\n4096 4096 zero")
    engine.create("fp-lower", f"0 4096 linear {a} 0")
    engine.create("fp-upper", f"0 4096 linear {engine.device_ref('fp-lower')} 0")
    assert describe(engine._get("fp-mix", "t").live) is None  # type: ignore[arg-type]
    assert describe(engine._get("fp-upper", "t").live) is None  # type: ignore[arg-type]
    assert describe(engine._get("fp-lower", "t").live) is not None  # type: ignore[arg-type]


@pytest.mark.parametrize("table", ["linear", "striped"])
def test_aligned_large_requests_go_direct_and_match(lib, ctx, engine, tmp_path, table):
    """Requests of DIRECT_MIN or more from page-aligned buffers (as the receive loop hands them
    over): O_DIRECT runs, several stripes' runs in flight at once; the bytes are the targets'."""
    from dmtools.blockdev import aligned_buffer

    a, b, c = _images(tmp_path, 8 * MiB, 8 * MiB, 8 * MiB)
    tables = {"linear": f"0 14336 linear {a} 2048", "striped": f"0 36864 striped 3 128 {a} 0 {b} 2048 {c} 4096"}
    engine.create("fp-al", tables[table])
    size = engine._get("fp-al", "test").size
    slot = _mapped(lib, ctx, engine, "fp-al")
    rng = random.Random(table)
    buf = aligned_buffer(MiB)
    for _ in range(24):
        n = rng.choice([256 << 10, 512 << 10, MiB])
        off = rng.randrange(0, (size - n) // 4096 + 1) * 4096
        data = os.urandom(n)
        buf[:n] = data
        assert lib.slot_write(ctx, slot, memoryview(buf)[:n], off) == n
        assert _python_read(engine, "fp-al", n, off) == data
        buf[:n] = bytes(n)
        assert lib.slot_read(ctx, slot, memoryview(buf)[:n], off) == n
        assert bytes(buf[:n]) == data
    stats = lib.slot_stats(ctx, slot)
    assert stats["writes"] == stats["reads"] == 24 and stats["errors"] == 0
