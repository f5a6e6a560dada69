"""Exclusive claims on image files (unit tier: no root needed for file locks).

The userspace engine claims every device its live and inactive tables use, as ``bd_claim`` does
for the kernel's tables (one holder for all of an engine's tables). Another engine, or an offline
tool through ``dmtools.claims.claim``, is refused with ``DeviceBusy`` and nothing changes.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmtools import claims
from dmtools.engine import Engine
from dmtools.errors import DeviceBusy, DeviceNotFound

MiB = 1 << 20


@pytest.fixture
def second() -> Iterator[Engine]:
    eng = Engine()
    yield eng
    eng.close()


def test_second_engine_is_refused_and_nothing_changes(engine: Engine, second: Engine,
                                                      make_image: Callable[..., Path]) -> None:
    img, other = make_image(4 * MiB), make_image(4 * MiB)
    engine.create("a", f"0 2048 linear {img} 0")
    with pytest.raises(DeviceBusy) as exc:
        second.create("b", f"0 1024 linear {other} 0\n1024 1024 linear {img} 4096")
    assert exc.value.errno == errno.EBUSY
    assert str(img) in str(exc.value) and "claimed by another engine or tool" in str(exc.value)
    assert second.list() == []
    # The refused table released what it had claimed before the failure (``other``).
    with claims.claim(other):
        pass
    # Loading into an existing device is refused the same way, and leaves it as it was.
    second.create("c", f"0 1024 linear {other} 0")
    with pytest.raises(DeviceBusy):
        second.load("c", f"0 1024 linear {img} 0")
    assert not second.info("c").inactive_table
    assert second.table_text("c") == f"0 1024 linear {other} 0"


def test_one_engine_nests_tables_on_one_device(engine: Engine, make_image: Callable[..., Path]) -> None:
    img = make_image(4 * MiB)
    engine.create("a", f"0 2048 linear {img} 0")
    engine.create("b", f"0 2048 linear {img} 2048")  # two LVs on one PV
    engine.create("c", f"0 1024 linear {engine.device_ref('a')} 0")
    engine.remove("c")
    engine.remove("a")
    with pytest.raises(DeviceBusy):  # still claimed by b
        with claims.claim(img):
            pass
    engine.remove("b")
    with claims.claim(img):
        pass


def test_offline_tool_and_engine_exclude_each_other(engine: Engine, make_image: Callable[..., Path]) -> None:
    img = make_image(MiB)
    with claims.claim(img):
        with pytest.raises(DeviceBusy):
            engine.create("a", f"0 2048 linear {img} 0")
    assert engine.list() == []
    engine.create("a", f"0 2048 linear {img} 0")
    with pytest.raises(DeviceBusy, match="claimed by another engine or tool"):
        with claims.claim(img):
            pass
    # A symlink or another spelling names the same file and the same lock.
    link = img.parent / "link.img"
    link.symlink_to(img)
    with pytest.raises(DeviceBusy):
        with claims.claim(link):
            pass


def test_table_swap_releases_the_old_devices_after_resume(engine: Engine, second: Engine,
                                                          make_image: Callable[..., Path]) -> None:
    old, new = make_image(MiB), make_image(MiB)
    engine.create("a", f"0 2048 linear {old} 0")
    engine.load("a", f"0 2048 linear {new} 0")
    # The inactive table holds its devices already (dm_get_device at load), the live one its own.
    for path in (old, new):
        with pytest.raises(DeviceBusy):
            second.create("x", f"0 8 linear {path} 0")
    engine.clear("a")
    second.create("x", f"0 8 linear {new} 0")  # clear released the inactive table's claim
    second.remove("x")
    engine.load("a", f"0 2048 linear {new} 0")
    engine.resume("a")
    second.create("x", f"0 8 linear {old} 0")  # the old table went after the resume
    with pytest.raises(DeviceBusy):
        second.create("y", f"0 8 linear {new} 0")


def test_remove_and_close_release_claims(make_image: Callable[..., Path]) -> None:
    img = make_image(MiB)
    eng = Engine()
    eng.create("a", f"0 2048 linear {img} 0")
    eng.close()
    with claims.claim(img):
        pass


def test_holder_refcounts_and_reports(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    img = make_image(MiB)
    holder = claims.Holder("test")
    one, two = holder.claim(str(img)), holder.claim(str(img))
    assert len(set(one.keys)) == 1 and holder.holds(one.keys[0])
    one.release()
    one.release()  # twice is once
    assert holder.holds(two.keys[0])
    two.release()
    assert not holder.holds(two.keys[0])
    with pytest.raises(DeviceNotFound):
        holder.claim(str(tmp_path / "missing"))
    with pytest.raises(DeviceNotFound, match="not a block device or regular file"):
        holder.claim(str(tmp_path))
    holder.close()


def test_a_file_just_created_is_claimed_without_searching_loops(tmp_path: Path, monkeypatch) -> None:
    """``created=True`` (``dmtools copy``'s new destination files) takes the lock but does not read
    every loop device; any other file's claim still searches them."""
    searched: list[str] = []
    monkeypatch.setattr(claims, "loops_over", lambda path, st=None: searched.append(path) or [])
    new, old = tmp_path / "new.img", tmp_path / "old.img"
    new.write_bytes(b"")
    old.write_bytes(b"")
    holder = claims.Holder("test")
    holder.claim(str(new), created=True)
    assert searched == []
    holder.claim(str(old))
    assert searched == [str(old)]
    with pytest.raises(DeviceBusy):  # the lock is taken all the same
        claims.Holder("other").claim(str(new), created=True)
    holder.close()
