"""The userspace ``mirror`` target's IMA text (``measure``, STATUSTYPE_IMA of dm-raid1.c)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from dmtools.backend import StatusLine

MiB = 1 << 20
LEN = 2 * MiB // 512


def _head(eng: Any) -> str:
    version = ".".join(map(str, eng.targets()["mirror"]))
    return f"target_name=mirror,target_version={version}"


def test_features_and_legs(engine: Any, make_image: Callable[..., Path]) -> None:
    legs = [str(make_image(3 * MiB)) for _ in range(3)]
    log = str(make_image(MiB))
    engine.create("m", f"0 {LEN} mirror disk 2 {log} 128 3 {legs[0]} 0 {legs[1]} 0 {legs[2]} 8")
    assert engine.measure("m") == [StatusLine(0, LEN, "mirror", (
        f"{_head(engine)},nr_mirrors=3"
        f",mirror_device_0={legs[0]},mirror_device_0_status=A"
        f",mirror_device_1={legs[1]},mirror_device_1_status=A"
        f",mirror_device_2={legs[2]},mirror_device_2_status=A"
        ",handle_errors=n,keep_log=n,log_type_status=;"))]
    engine.create("h", f"0 {LEN} mirror core 1 128 2 {legs[0]} 0 {legs[1]} 0 1 handle_errors")
    assert engine.measure("h")[0].params.endswith(",handle_errors=y,keep_log=n,log_type_status=;")


def test_failed_leg_measures_d(engine: Any, make_image: Callable[..., Path]) -> None:
    """A leg whose write failed is ``D`` in the IMA text, as in the status health letters."""
    leg0, leg1 = str(make_image(2 * MiB)), str(make_image(2 * MiB))
    engine.create("leg1", f"0 {LEN} linear {leg1} 0")
    ref = engine.device_ref("leg1")
    engine.create("m", f"0 {LEN} mirror core 2 128 nosync 2 {leg0} 0 {ref} 0 2 handle_errors keep_log")
    engine.load("leg1", f"0 {LEN} error")
    engine.resume("leg1")
    with engine.open_endpoint("m") as ep:
        ep.write(b"w" * 65536, 0)  # completes on leg 0 (keep_log), fails on leg 1
        ep.flush()
    status = engine.status("m")[0].params.split()
    assert status[5] == "AD"
    assert engine.measure("m")[0].params == (
        f"{_head(engine)},nr_mirrors=2,mirror_device_0={leg0},mirror_device_0_status=A"
        f",mirror_device_1={ref},mirror_device_1_status=D"
        ",handle_errors=y,keep_log=y,log_type_status=;")
    engine.remove("m")
