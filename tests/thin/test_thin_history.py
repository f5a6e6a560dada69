"""Random pool histories (create, snapshot, map, unmap, delete, commit, abort, metadata snapshots)
against a model; the metadata must pass thin_check and our checker, and dump (by thin_dump) to the
model's XML after every commit."""

from __future__ import annotations

import copy
import io
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from thin_helpers import DeviceModel, PoolModel

from dmtools.errors import DeviceBusy, DeviceExists, DeviceNotFound, InvalidArgument, NoSpace
from thin.metadata import ThinMetadata, dump_xml
from thin.metadata.check import check

IDS = st.sampled_from([0, 1, 2, 3, 77, (1 << 24) - 1])
NR_DATA = 3000


class PoolHistory(RuleBasedStateMachine):
    tools = None  # set by the test from the thin_tools fixture

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="dmtt-thin-"))
        self.meta = self.dir / "meta.img"
        with open(self.meta, "wb") as f:
            f.truncate(8 << 20)
        self.md = ThinMetadata.format(self.meta, data_block_size=128, nr_data_blocks=NR_DATA)
        self.model = PoolModel(nr_data_blocks=NR_DATA)
        self.committed = copy.deepcopy(self.model)
        self.held: PoolModel | None = None
        self.committed_held: PoolModel | None = None

    def teardown(self) -> None:
        try:
            self.commit()
        finally:
            self.md.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- rules -------------------------------------------------------------------------------
    @rule(dev=IDS)
    def create_thin(self, dev: int) -> None:
        if dev in self.model.devices:
            with pytest.raises(DeviceExists):
                self.md.create_thin(dev)
            return
        self.md.create_thin(dev)
        m = self.model
        m.devices[dev] = DeviceModel(m.transaction, m.time, m.time)

    @rule(dev=IDS, origin=IDS)
    def create_snap(self, dev: int, origin: int) -> None:
        m = self.model
        if dev in m.devices:
            with pytest.raises(DeviceExists):
                self.md.create_snap(dev, origin)
            return
        if origin not in m.devices:
            with pytest.raises(DeviceNotFound):
                self.md.create_snap(dev, origin)
            return
        self.md.create_snap(dev, origin)
        m.time += 1
        m.devices[origin].snap_time = m.time
        m.devices[dev] = DeviceModel(m.transaction, m.time, m.time, dict(m.devices[origin].mappings))

    @rule(dev=IDS)
    def delete(self, dev: int) -> None:
        if dev not in self.model.devices:
            with pytest.raises(DeviceNotFound):
                self.md.delete(dev)
            return
        self.md.delete(dev)
        del self.model.devices[dev]

    @rule(dev=IDS, start=st.integers(0, 3000), length=st.integers(1, 300))
    def map_run(self, dev: int, start: int, length: int) -> None:
        if dev not in self.model.devices:
            with pytest.raises(DeviceNotFound):
                self.md.insert(dev, start, 0)
            return
        for v in range(start, start + length):
            try:
                b = self.md.alloc_data_block()
            except NoSpace:
                return
            self.md.insert(dev, v, b)
            self.model.devices[dev].mappings[v] = (b, self.model.time)

    @rule(dev=IDS, start=st.integers(0, 3000), length=st.integers(1, 400))
    def unmap_run(self, dev: int, start: int, length: int) -> None:
        if dev not in self.model.devices:
            return
        gone = self.md.remove_range(dev, start, start + length)
        maps = self.model.devices[dev].mappings
        expected = [v for v in maps if start <= v < start + length]
        assert gone == len(expected)
        for v in expected:
            del maps[v]

    @rule(dev=IDS, v=st.integers(0, 3300))
    def lookup(self, dev: int, v: int) -> None:
        if dev not in self.model.devices:
            return
        found = self.md.lookup(dev, v)
        want = self.model.devices[dev].mappings.get(v)
        assert (found and (found.data_block, found.time)) == (want or None)
        if found:
            assert found.shared == (self.model.devices[dev].snap_time > found.time)

    @rule(new=st.integers(0, 1 << 64 - 1))
    def set_transaction_id(self, new: int) -> None:
        with pytest.raises(InvalidArgument):
            self.md.set_transaction_id(self.model.transaction + 1, new)
        self.md.set_transaction_id(self.model.transaction, new)
        self.model.transaction = new

    @rule(extra=st.integers(0, 40000))
    def resize_data(self, extra: int) -> None:
        with pytest.raises(InvalidArgument):
            self.md.resize_data(self.model.nr_data_blocks - 1)
        self.md.resize_data(self.model.nr_data_blocks + extra)
        self.model.nr_data_blocks += extra

    @rule()
    def commit(self) -> None:
        self.md.commit()
        self.committed = copy.deepcopy(self.model)
        self.committed_held = copy.deepcopy(self.held)
        self.verify()

    @rule()
    def abort(self) -> None:
        self.md.abort()
        self.model = copy.deepcopy(self.committed)
        self.held = copy.deepcopy(self.committed_held)

    @rule()
    def reserve_metadata_snap(self) -> None:
        if self.held is not None:
            with pytest.raises(DeviceBusy):
                self.md.reserve_metadata_snap()
            return
        self.md.reserve_metadata_snap()  # commits first
        self.committed = copy.deepcopy(self.model)
        self.committed_held = copy.deepcopy(self.held)
        self.held = copy.deepcopy(self.model)
        self.held.nr_data_blocks = 0  # a held snapshot has no space-map roots

    @precondition(lambda self: self.held is not None)
    @rule()
    def release_metadata_snap(self) -> None:
        self.md.release_metadata_snap()
        self.held = None

    @invariant()
    def free_counts_add_up(self) -> None:
        used = {b for d in self.model.devices.values() for b, _t in d.mappings.values()}
        if self.held is None:
            # every data block referenced is allocated; without a held snapshot nothing else is
            assert self.model.nr_data_blocks - self.md.free_data_blocks == len(used)

    # -- verification ------------------------------------------------------------------------
    def verify(self) -> None:
        assert self.tools is not None
        self.tools.check(self.meta)
        report = check(self.meta)
        assert report.ok and not report.leaks and not report.warnings, (report.errors, report.leaks, report.warnings)
        assert self.tools.dump(self.meta) == self.committed.xml()
        out = io.StringIO()
        with ThinMetadata.open(self.meta) as md:
            dump_xml(md, out)
        assert out.getvalue() == self.committed.xml()
        if self.committed_held is not None:
            self.tools.check(self.meta, "-m")
            assert self.tools.dump(self.meta, "-m") == self.committed_held.xml()


def test_pool_histories(thin_tools) -> None:
    PoolHistory.tools = thin_tools
    run = PoolHistory.TestCase
    run.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])
    run().runTest()
