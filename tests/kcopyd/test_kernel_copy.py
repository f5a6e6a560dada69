"""Kernel tier: kcopyd copying between real device-mapper devices (run: scripts/vmtest)."""

from __future__ import annotations

import contextlib

import pytest

import kcopyd
from kc_helpers import TIMEOUT, Recorder, pattern

pytestmark = pytest.mark.kernel

MiB = 1 << 20
SIZE = 8 * MiB
SECTORS = SIZE // 512


def _name(dm_name: str, tag: str) -> str:
    return f"{dm_name[: -len('-dmtt')]}{tag}-dmtt"


@contextlib.contextmanager
def _devices(dm, tables: dict[str, str]):
    made = []
    try:
        for name, table in tables.items():
            dm.create(name, table)
            made.append(name)
        yield {name: dm.device_path(name) for name in made}
    finally:
        for name in reversed(made):
            dm.remove(name, retry=True)


def _read(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_copy_between_linear_devices_and_to_an_error_target(kernel_dm, make_loop, make_image, dm_name):
    data = pattern(SIZE, seed=42)
    src_img = make_image(SIZE)
    src_img.write_bytes(data)
    lo_src, lo_dst = make_loop(src_img), make_loop(make_image(SIZE + MiB))
    names = {_name(dm_name, t): None for t in ("src", "dst", "err")}
    src_n, dst_n, err_n = names
    tables = {
        src_n: f"0 {SECTORS} linear {lo_src.path} 0",
        dst_n: f"0 {SECTORS} linear {lo_dst.path} 2048",
        err_n: f"0 {SECTORS} error",
    }
    with _devices(kernel_dm, tables) as paths:
        rec = Recorder()
        with kcopyd.Client() as kc:
            job = kc.copy(kcopyd.Region(paths[src_n], 0, SECTORS),
                          [kcopyd.Region(paths[dst_n], 0, SECTORS), kcopyd.Region(paths[err_n], 0, SECTORS)],
                          flags=kcopyd.IGNORE_ERROR, notify=rec, context="k")
            assert job.wait(TIMEOUT)
        assert rec.calls == [(False, 0b10, "k")], "only the error target's bit is set"
        assert _read(paths[dst_n], 0, SIZE) == data
    # the linear device mapped the loop device from sector 2048 on
    assert _read(lo_dst.path, MiB, SIZE) == data


def test_read_from_an_error_target_reports_read_err(kernel_dm, make_loop, make_image, dm_name):
    lo = make_loop(make_image(SIZE))
    src_n, dst_n = _name(dm_name, "esrc"), _name(dm_name, "edst")
    tables = {src_n: f"0 {SECTORS} error", dst_n: f"0 {SECTORS} linear {lo.path} 0"}
    with _devices(kernel_dm, tables) as paths:
        rec = Recorder()
        with kcopyd.Client() as kc:
            job = kc.copy(kcopyd.Region(paths[src_n], 0, SECTORS), [kcopyd.Region(paths[dst_n], 0, SECTORS)],
                          notify=rec)
            assert job.wait(TIMEOUT)
        assert rec.calls == [(True, 0, None)]
