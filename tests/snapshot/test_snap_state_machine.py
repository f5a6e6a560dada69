"""A hypothesis state machine: random origin and snapshot writes, snapshots taken, merged and
dropped at random, persistent snapshots re-activated from their COW; every read is compared with a
model that is just a bytearray per device."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dmtools.engine import Engine
from dmtools.target_values import StoreMode
from snapshot import SnapshotManager

SECTORS = 128  # 64 KiB origin
SIZE = SECTORS * 512


class SnapshotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="snap-sm-"))
        self.eng = Engine()
        self.mgr = SnapshotManager(self.eng, poll_interval=0.002)
        (self.tmp / "vol.img").write_bytes(bytes(SIZE))
        self.eng.create("vol", f"0 {SECTORS} linear {self.tmp / 'vol.img'} 0")
        self.origin = bytearray(SIZE)
        self.snaps: dict[str, bytearray] = {}
        self.persistent: dict[str, bool] = {}
        self.counter = 0

    def teardown(self) -> None:
        self.eng.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _io(self, name: str, data: bytes, sector: int) -> None:
        with self.eng.open_endpoint(name) as ep:
            ep.write(data, sector * 512)

    def _read(self, name: str) -> bytes:
        buf = bytearray(SIZE)
        with self.eng.open_endpoint(name, writable=False) as ep:
            ep.readinto(buf, 0)
        return bytes(buf)

    @rule(sector=st.integers(0, SECTORS - 1), count=st.integers(1, 24), fill=st.integers(1, 255))
    def write_origin(self, sector: int, count: int, fill: int) -> None:
        count = min(count, SECTORS - sector)
        data = bytes([fill]) * (count * 512)
        self._io("vol", data, sector)
        self.origin[sector * 512 : (sector + count) * 512] = data

    @precondition(lambda self: self.snaps)
    @rule(data=st.data(), sector=st.integers(0, SECTORS - 1), count=st.integers(1, 24), fill=st.integers(1, 255))
    def write_snapshot(self, data: st.DataObject, sector: int, count: int, fill: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        count = min(count, SECTORS - sector)
        payload = bytes([fill]) * (count * 512)
        self._io(name, payload, sector)
        self.snaps[name][sector * 512 : (sector + count) * 512] = payload

    @precondition(lambda self: len(self.snaps) < 3)
    @rule(chunk=st.sampled_from([8, 16, 32]), persistent=st.booleans())
    def take_snapshot(self, chunk: int, persistent: bool) -> None:
        self.counter += 1
        name = f"s{self.counter}"
        cow = self.tmp / f"{name}.cow"
        with open(cow, "wb") as f:
            f.truncate(3 * SIZE)  # never fills up
        store = StoreMode.PERSISTENT if persistent else StoreMode.TRANSIENT
        self.mgr.create("vol", str(cow), name, chunk_size=chunk, store=store)
        self.snaps[name] = bytearray(self.origin)
        self.persistent[name] = persistent

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def drop_snapshot(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.mgr.remove(name)
        del self.snaps[name]

    @precondition(lambda self: any(self.persistent[n] for n in self.snaps))
    @rule(data=st.data())
    def merge_snapshot(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n in self.snaps if self.persistent[n])))
        self.mgr.merge(name, timeout=30)
        self.origin = self.snaps.pop(name)

    @precondition(lambda self: any(self.persistent[n] for n in self.snaps))
    @rule(data=st.data())
    def reactivate(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n in self.snaps if self.persistent[n])))
        self.mgr.remove(name)
        self.mgr.activate("vol", str(self.tmp / f"{name}.cow"), name)

    @invariant()
    def reads_match_the_model(self) -> None:
        assert self._read("vol") == bytes(self.origin)
        for name, model in self.snaps.items():
            assert self._read(name) == bytes(model), name


TestSnapshotMachine = SnapshotMachine.TestCase
TestSnapshotMachine.settings = settings(max_examples=60, stateful_step_count=15, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
