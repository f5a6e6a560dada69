"""A hypothesis state machine on the userspace thin-pool/thin targets: thin devices created,
snapshotted (origin suspended, as LVM does), deleted, written, discarded and flushed at random, the
pool torn down and activated again from its metadata; every read is compared with a model (a
bytearray and a set of mapped blocks per device), and ``thin_check`` runs on the metadata at the
end of every run.

``DMTOOLS_FUZZ_EXAMPLES`` sets the number of runs (default 20).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dmtools.engine import Engine
from dmtools.target_values import ThinPool

BLOCK = 128  # sectors
BB = BLOCK * 512
BLOCKS = 12  # per thin device
SIZE = BLOCKS * BB
DATA_BLOCKS = 5 * BLOCKS  # never runs out: at most 4 devices, each fully written
EXAMPLES = int(os.environ.get("DMTOOLS_FUZZ_EXAMPLES", "20"))


def _thin_check() -> str:
    tool = shutil.which("thin_check") or ("/usr/sbin/thin_check" if os.path.exists("/usr/sbin/thin_check") else "")
    if not tool:
        reason = "needs thin_check (apt-get install thin-provisioning-tools; scripts/setup-env does it)"
        if os.environ.get("DMTOOLS_NO_SKIP") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return tool


class ThinMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.thin_check = _thin_check()
        self.tmp = Path(tempfile.mkdtemp(prefix="thin-sm-"))
        self.meta = self.tmp / "meta.img"
        self.data = self.tmp / "data.img"
        with open(self.meta, "wb") as f:
            f.truncate(4 << 20)
        with open(self.data, "wb") as f:
            f.truncate(DATA_BLOCKS * BB)
        self.eng = Engine()
        self._activate_pool()
        self.models: dict[int, bytearray] = {}
        self.mapped: dict[int, set[int]] = {}
        self.next_id = 1

    def _activate_pool(self) -> None:
        value = ThinPool(str(self.meta), str(self.data), BLOCK, 0, ())
        self.eng.create("pool", f"0 {DATA_BLOCKS * BLOCK} thin-pool {value.params}")

    def _activate(self, dev_id: int) -> None:
        self.eng.create(f"t{dev_id}", f"0 {BLOCKS * BLOCK} thin {self.eng.device_ref('pool')} {dev_id}")

    def teardown(self) -> None:
        try:
            self.eng.close()
            done = subprocess.run([self.thin_check, str(self.meta)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _message(self, text: str) -> None:
        self.eng.message("pool", 0, text)

    def _pick(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.models)))

    @precondition(lambda self: len(self.models) < 4)
    @rule()
    def create_thin(self) -> None:
        dev_id, self.next_id = self.next_id, self.next_id + 1
        self._message(f"create_thin {dev_id}")
        self._activate(dev_id)
        self.models[dev_id] = bytearray(SIZE)
        self.mapped[dev_id] = set()

    @precondition(lambda self: 0 < len(self.models) < 4)
    @rule(data=st.data())
    def snapshot(self, data: st.DataObject) -> None:
        origin = self._pick(data)
        dev_id, self.next_id = self.next_id, self.next_id + 1
        self.eng.suspend(f"t{origin}")
        try:
            self._message(f"create_snap {dev_id} {origin}")
        finally:
            self.eng.resume(f"t{origin}")
        self._activate(dev_id)
        self.models[dev_id] = bytearray(self.models[origin])
        self.mapped[dev_id] = set(self.mapped[origin])

    @precondition(lambda self: self.models)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        dev_id = self._pick(data)
        self.eng.remove(f"t{dev_id}")
        self._message(f"delete {dev_id}")
        del self.models[dev_id], self.mapped[dev_id]

    @precondition(lambda self: self.models)
    @rule(data=st.data(), sector=st.integers(0, BLOCKS * BLOCK - 1), count=st.integers(1, 4 * BLOCK + 8),
          fill=st.integers(1, 255))
    def write(self, data: st.DataObject, sector: int, count: int, fill: int) -> None:
        dev_id = self._pick(data)
        count = min(count, BLOCKS * BLOCK - sector)
        payload = bytes([fill]) * (count * 512)
        with self.eng.open_endpoint(f"t{dev_id}") as ep:
            ep.write(payload, sector * 512)
        self.models[dev_id][sector * 512:(sector + count) * 512] = payload
        self.mapped[dev_id].update(range(sector // BLOCK, (sector + count - 1) // BLOCK + 1))

    @precondition(lambda self: self.models)
    @rule(data=st.data(), sector=st.integers(0, BLOCKS * BLOCK - 1), count=st.integers(1, 4 * BLOCK))
    def discard(self, data: st.DataObject, sector: int, count: int) -> None:
        dev_id = self._pick(data)
        count = min(count, BLOCKS * BLOCK - sector)
        with self.eng.open_endpoint(f"t{dev_id}") as ep:
            ep.discard(sector * 512, count * 512)
        first, end = -(-sector // BLOCK), (sector + count) // BLOCK  # whole blocks only
        for b in range(first, end):
            self.models[dev_id][b * BB:(b + 1) * BB] = bytes(BB)
            self.mapped[dev_id].discard(b)

    @precondition(lambda self: self.models)
    @rule(data=st.data())
    def flush(self, data: st.DataObject) -> None:
        with self.eng.open_endpoint(f"t{self._pick(data)}") as ep:
            ep.flush()

    @rule()
    def restart_pool(self) -> None:
        """Everything down (the pool commits at close), then up again from the metadata."""
        for dev_id in self.models:
            self.eng.remove(f"t{dev_id}")
        self.eng.remove("pool")
        self._activate_pool()
        for dev_id in self.models:
            self._activate(dev_id)

    @invariant()
    def reads_and_mappings_match_the_model(self) -> None:
        for dev_id, model in self.models.items():
            buf = bytearray(SIZE)
            with self.eng.open_endpoint(f"t{dev_id}", writable=False) as ep:
                ep.readinto(buf, 0)
            assert buf == model, dev_id
            mapped, _highest = self.eng.status(f"t{dev_id}")[0].params.split()
            assert int(mapped) == len(self.mapped[dev_id]) * BLOCK, dev_id


TestThinMachine = ThinMachine.TestCase
TestThinMachine.settings = settings(max_examples=EXAMPLES, stateful_step_count=20, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
