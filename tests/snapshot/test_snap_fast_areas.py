"""The first writes in C (``snapshot.store.fast``, dms.c ``dms_snap_write``) past a metadata
area's end: the record that fills an area is committed in C as the store commits it (the next
area zeroed first, then the copy, PREFLUSH, the full area, FUA), C goes on in the next area, and
the fence hands that area back; a failure at any step of that write goes on in Python."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from snap_helpers import FAULTS, c_ops, only_snapshot
from snap_stack import Stack

from snapshot.route import c_library
from snapshot.store.persistent import PersistentStore

CB = 4096  # chunk size 8 sectors: 256 records per area, an area every 257 chunks
CHUNKS = 600
EPA = CB // 16
_C = c_library()
LIB = None if _C is None else _C[1]
pytestmark = pytest.mark.skipif(LIB is None, reason="no C library (no compiler, or DMTOOLS_FAST_IO=0)")


def _origin_bytes() -> bytes:
    return random.Random(11).randbytes(CHUNKS * CB)


def _stack(engine: Any, tmp_path: Path) -> Stack:
    """An origin with one persistent snapshot on the COW device ``t-cow`` (a linear segment over
    its file, as C requires)."""
    st = Stack(engine, tmp_path, _origin_bytes())
    cow = st.cow_file("s", 2 * CHUNKS * CB)
    engine.create("t-cow", f"0 {2 * CHUNKS * CB // 512} linear {cow} 0")
    st.add_snapshot("s", 0, cow=engine.device_ref("t-cow"))
    return st


def _reloaded(engine: Any) -> dict[int, int]:
    """The exceptions a store loaded from the COW holds (the kernel's reader)."""
    with engine.open_endpoint("t-cow", writable=False) as ep:
        store = PersistentStore(ep, 8, readonly=True)
        store.read_metadata()
        return dict(store.iter_records())


def _expected(written: list[int]) -> bytes:
    origin = bytearray(_origin_bytes())
    for c in written:
        origin[c * CB : c * CB + 512] = bytes([c % 250 + 1]) * 512
    return bytes(origin)


def test_the_record_filling_an_area_is_committed_in_c(engine: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    allocations: list[int] = []
    prepare = PersistentStore.prepare_exception

    def counted(store: PersistentStore) -> int:
        allocations.append(1)
        return prepare(store)

    monkeypatch.setattr(PersistentStore, "prepare_exception", counted)
    st = _stack(engine, tmp_path)
    snap = only_snapshot(engine)
    chunks = random.Random(2).sample(range(CHUNKS), 300)
    with engine.open_endpoint(st.base) as ep:
        for i, c in enumerate(chunks):
            ep.write(bytes([c % 250 + 1]) * 512, c * CB)
            if i == EPA - 1:  # the record that fills area 0: zeros ahead, the next area zeroed
                assert c_ops() == "zarwfwfw"
    assert len(allocations) == 1  # the first write's (the store's first zeroing ahead), no other
    assert snap._fast is not None and snap._fast.armed
    snap.sync()
    store = snap.store
    assert snap.valid and store.records == 300
    assert (store.current_area, store.current_committed) == (1, 300 - EPA)
    assert {old: snap.table.lookup(old) for old in chunks} == _reloaded(engine)
    assert st.read("s") == _origin_bytes()
    assert st.read(st.base) == _expected(chunks)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failure_filling_an_area_goes_on_in_python(engine: Any, tmp_path: Path, fault: str) -> None:
    """The write that fills the area fails at one step: the origin write lands all the same, and
    the snapshot is valid with every record (the area written again, or the copy made by the
    Python path), or invalid as the Python path leaves it; the next writes go on past the area."""
    step, short, calls, valid = FAULTS[fault]
    st = _stack(engine, tmp_path)
    snap = only_snapshot(engine)
    chunks = random.Random(3).sample(range(CHUNKS), EPA + 10)
    with engine.open_endpoint(st.base) as ep:
        for i, c in enumerate(chunks):
            if i == EPA - 1:
                LIB.dms_set_fault(step, int(short))
            try:
                ep.write(bytes([c % 250 + 1]) * 512, c * CB)
            finally:
                if i == EPA - 1:
                    ops = c_ops()
                    LIB.dms_set_fault(-1, 0)
    assert ops == "za" + calls
    snap.sync()
    assert snap.valid is valid
    assert st.read(st.base) == _expected(chunks)
    if valid:
        assert snap.store.records == len(chunks) and snap.store.current_area == 1
        assert {old: snap.table.lookup(old) for old in chunks} == _reloaded(engine)
        assert st.read("s") == _origin_bytes()
    else:
        assert "Invalid" in st.status("s")
