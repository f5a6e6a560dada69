"""Unit tier: the pool record (two slots, torn writes, LVM's device ids) and the manager's refusal on
a backend without thin targets (a clear one-line error; nothing written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import CorruptMetadata, InvalidArgument, TargetNotSupported
from thin.pool_record import RECORD_SECTORS, SLOT_BYTES, PoolRecord, ThinVolume, has_record, read_record, write_record


def _record(**changes: Any) -> PoolRecord:
    base = PoolRecord("pool", 128, ("skip_block_zeroing",), 0, 131072, 16000)
    return base.with_changes(**changes)


@pytest.fixture
def meta(tmp_path: Path) -> str:
    p = tmp_path / "meta.img"
    with open(p, "wb") as f:
        f.truncate(8 << 20)
    return str(p)


def test_record_round_trip_and_slots(meta: str) -> None:
    assert not has_record(meta)
    with pytest.raises(CorruptMetadata, match="no dmtools thin-pool record"):
        read_record(meta)
    first = write_record(meta, _record(volumes={"a": ThinVolume(1, 2048)}))
    assert first.seq == 1 and has_record(meta)
    assert read_record(meta) == first
    second = write_record(meta, first.with_changes(transaction_id=1, pending=("create_thin 2",),
                                                   volumes={**first.volumes, "b": ThinVolume(2, 4096, "a")}))
    assert read_record(meta) == second and second.seq == 2
    raw = Path(meta).read_bytes()
    # seq 1 went to slot 1, seq 2 to slot 0; nothing beyond the record area was written
    assert raw[SLOT_BYTES:SLOT_BYTES + 16] == raw[:16] == b"dmtools-thinpool"
    assert not any(raw[RECORD_SECTORS * 512:])


def test_a_torn_write_leaves_the_previous_record(meta: str) -> None:
    first = write_record(meta, _record())
    second = write_record(meta, first.with_changes(transaction_id=7))
    with open(meta, "r+b") as f:  # the newest slot (seq 2 -> slot 0) half written
        f.seek(40)
        f.write(b"\xff" * 100)
    assert read_record(meta) == first
    assert read_record(meta).transaction_id == 0 != second.transaction_id


def test_record_that_does_not_fit(meta: str) -> None:
    many = {f"volume-{i:06d}-" + "x" * 80: ThinVolume(i, 8) for i in range(2000)}
    with pytest.raises(InvalidArgument, match="does not fit"):
        write_record(meta, _record(volumes=many))
    assert not has_record(meta)


def test_lvm_device_ids() -> None:
    assert _record().next_dev_id() == 1
    vols = {"a": ThinVolume(1, 8), "b": ThinVolume(5, 8)}
    assert _record(volumes=vols).next_dev_id() == 6  # holes are not reused, as LVM


def test_userspace_engine_refuses_with_a_clear_error(tmp_path: Path, meta: str, capsys: Any, monkeypatch: Any) -> None:
    from dmtools.cli import main as cli_main
    from dmtools.engine import Engine
    from thin.manager import ThinPoolManager

    data = tmp_path / "data.img"
    with open(data, "wb") as f:
        f.truncate(64 << 20)
    eng = Engine()
    # A backend without the thin targets (the seam: what its targets() lists).
    monkeypatch.setattr(eng, "targets", lambda: {"linear": (1, 5, 0)})
    try:
        with pytest.raises(TargetNotSupported, match="no thin-pool/thin target"):
            ThinPoolManager(eng).create_pool("p", meta, str(data))
        assert eng.list() == [] and not any(Path(meta).read_bytes())
        monkeypatch.setattr("dmtools.cli.common.open_backend", lambda args: eng)
        rc = cli_main.main(["--backend", "userspace", "thin", "pool", "create", "p", "--metadata", meta,
                            "--data", str(data)])
    finally:
        eng.close()
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "thin pools need a backend that has both" in err
    assert "Traceback" not in err
