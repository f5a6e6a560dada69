"""The fault-injecting test endpoints themselves (dmtools.testing.faults)."""

from __future__ import annotations

import threading

import pytest

from dmtools.errors import DeviceIOError, InvalidArgument, NoSpace
from dmtools.testing.faults import FaultyEndpoint, MemoryEndpoint, SlowEndpoint


def test_sector_faults_hit_only_their_sectors():
    ep = FaultyEndpoint(MemoryEndpoint(64 * 1024), read_errors=[3, range(10, 12)], write_errors=[(20, 2)])
    buf = bytearray(512)
    ep.readinto(buf, 2 * 512)
    with pytest.raises(DeviceIOError):
        ep.readinto(buf, 3 * 512)
    with pytest.raises(DeviceIOError):
        ep.readinto(bytearray(4096), 8 * 512)  # 8..15 meets 10..11
    ep.write(bytes(512), 19 * 512)
    with pytest.raises(DeviceIOError):
        ep.write(bytes(1024), 20 * 512)
    with pytest.raises(DeviceIOError):
        ep.zero(21 * 512, 512)
    assert [op for op, _, _, ok in ep.ops if not ok] == ["read", "read", "write", "zero"]


def test_rate_faults_are_deterministic_per_block():
    a = FaultyEndpoint(MemoryEndpoint(1 << 20), read_error_rate=0.2, seed=7)
    b = FaultyEndpoint(MemoryEndpoint(1 << 20), read_error_rate=0.2, seed=7)
    c = FaultyEndpoint(MemoryEndpoint(1 << 20), read_error_rate=0.2, seed=8)
    blocks = [off for off in range(0, 1 << 20, 4096) if a._fails("read", off, 4096)]
    assert blocks == [off for off in range(0, 1 << 20, 4096) if b._fails("read", off, 4096)]
    assert blocks != [off for off in range(0, 1 << 20, 4096) if c._fails("read", off, 4096)]
    assert 20 < len(blocks) < 90  # about 20% of 256 blocks
    # a larger request fails exactly when one of its blocks does
    assert a._fails("read", blocks[0] - 4096 if blocks[0] else 0, 8192)


def test_short_reads_and_enospc():
    ep = FaultyEndpoint(MemoryEndpoint(bytes(range(256)) * 16), short_reads=100, nospace_from=2048)
    buf = bytearray(1000)
    assert ep.readinto(buf, 0) == 100 and buf[:100] == bytes(range(100))
    ep.write(bytes(1024), 1024)
    with pytest.raises(NoSpace):
        ep.write(bytes(1024), 1536)
    assert ep.fileno() is None and not ep.is_regular_file
    with pytest.raises(InvalidArgument):
        FaultyEndpoint(MemoryEndpoint(512), read_error_rate=2.0)


def test_slow_endpoint_gate_holds_requests():
    gate = threading.Event()
    ep = SlowEndpoint(MemoryEndpoint(4096), gate=gate)
    t = threading.Thread(target=ep.readinto, args=(bytearray(512), 0))
    t.start()
    assert ep.started.wait(5)
    t.join(0.1)
    assert t.is_alive() and ep.in_flight == 1
    gate.set()
    t.join(5)
    assert not t.is_alive() and ep.in_flight == 0
    never = SlowEndpoint(MemoryEndpoint(4096), gate=threading.Event(), gate_timeout=0.05)
    with pytest.raises(DeviceIOError, match="gate"):
        never.write(bytes(512), 0)
