"""Thin pool auto-extend through the monitor (dmeventd's thin plugin with LVM's
``thin_pool_autoextend_threshold``/``_percent``), on the in-process engine over image files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dmtools.engine import Engine
from dmtools.errors import DMError, InvalidArgument
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings
from dmtools.testing.loops import backing
from thin.manager import ThinPoolManager

from ev_engine import policies

MiB = 1 << 20


def test_data_autoextend_before_the_pool_fills(engine: Engine, make_image: Callable[..., Path]) -> None:
    """A volume larger than its pool is written: the monitor grows the data file by 20 % each time
    usage reaches 70 %, so every write lands and the pool never runs out of space."""
    meta, data = backing(make_image)(8 * MiB, name="meta"), backing(make_image)(4 * MiB, name="data")
    tpm = ThinPoolManager(engine)
    tpm.create_pool("tp", meta, data, chunk_size=128)
    tpm.create("tp", "vol", 8 * MiB)
    settings = PolicySettings(thin_autoextend_threshold=70, thin_autoextend_percent=20)
    monitor = Monitor(engine, MonitorConfig(settings), event_numbers=False, uevents=False, policy_loader=policies)
    monitor.step()
    payload = os.urandom(6 * MiB)
    actions = []
    with engine.open_endpoint("vol") as ep:
        for off in range(0, len(payload), 256 << 10):
            ep.write(payload[off:off + (256 << 10)], off)
            ep.flush()
            actions += [e for e in monitor.step() if getattr(e, "policy", "") == "thin-autoextend"]
    assert actions and all(a.ok and "data grown by 20%" in a.detail for a in actions)
    assert os.path.getsize(data) >= 6 * MiB
    info = tpm.pool_status("tp")
    assert info.data_sectors * 512 == os.path.getsize(data) // (64 << 10) * (64 << 10)
    assert "out_of_data_space" not in engine.status("tp-tpool")[0].params
    with engine.open_endpoint("vol", writable=False) as ep:
        back = bytearray(len(payload))
        ep.readinto(back, 0)
    assert back == payload


def test_policy_settings_refuse_bad_percentages() -> None:
    with pytest.raises(InvalidArgument, match="thin_autoextend threshold"):
        PolicySettings(thin_autoextend_threshold=0)
    with pytest.raises(InvalidArgument, match="thin_autoextend percent"):
        PolicySettings(thin_autoextend_percent=0)
    assert PolicySettings(thin_autoextend_threshold=100).thin_autoextend_threshold is None  # LVM: 100 is off


def test_a_failing_extension_is_reported_once(engine: Engine, make_image: Callable[..., Path]) -> None:
    """The extension fails (the manager says why): one failed action, not one per scan, and the
    pool is untouched."""
    meta, data = backing(make_image)(8 * MiB, name="meta"), backing(make_image)(2 * MiB, name="data")
    tpm = ThinPoolManager(engine)
    tpm.create_pool("tp", meta, data, chunk_size=128)
    tpm.create("tp", "vol", 4 * MiB)

    class Refusing:
        def __init__(self, dm: object) -> None:
            pass

        def autoextend(self, pool: str, percent: int, *, data: bool, metadata: bool) -> None:
            assert (pool, percent, data, metadata) == ("tp", 20, True, False)
            raise DMError("no space left in the volume group", operation="extend", device=pool)

    monitor = Monitor(engine, MonitorConfig(PolicySettings(thin_autoextend_threshold=50)), event_numbers=False,
                      uevents=False, policy_loader=lambda name: Refusing)
    monitor.step()
    with engine.open_endpoint("vol") as ep:
        ep.write(os.urandom(3 * MiB // 2), 0)
        ep.flush()
    events = [e for e in monitor.step() + monitor.step() if getattr(e, "policy", "") == "thin-autoextend"]
    assert len(events) == 1 and not events[0].ok and "no space left in the volume group" in events[0].detail
    assert tpm.pool_status("tp").data_sectors == 2 * MiB // 512
