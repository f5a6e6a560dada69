"""Unit tier: engine internals with image files and test targets (no root needed)."""

from __future__ import annotations

import errno
import threading
from typing import Sequence

import pytest

from dmtools.engine import Engine, TargetDriver, TargetContext
from dmtools.errors import (DeviceBusy, DeviceExists, DeviceIOError, DeviceNotFound, InvalidArgument, InvalidTable, NoSpace,
                            TargetNotSupported)

MiB = 1 << 20


class Recorder(TargetDriver):
    """A zero-like target that records its hooks and answers messages."""

    name = "recorder"
    version = (9, 8, 7)
    calls: list[tuple[str, str]] = []

    def __init__(self, ctx: TargetContext, start: int, length: int, args: Sequence[str]) -> None:
        super().__init__(ctx, start, length, args)
        self.tag = args[0] if args else "-"
        if self.tag == "refuse-construct":
            raise self.fail("refused")
        self.data = bytearray(length * 512)

    def _log(self, what: str) -> None:
        Recorder.calls.append((what, self.tag))

    def read(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.data[offset : offset + len(buf)]

    def write(self, buf: memoryview, offset: int) -> None:
        self.data[offset : offset + len(buf)] = buf

    def table_params(self) -> str:
        return self.tag

    def status(self) -> str:
        return f"status-{self.tag}"

    def message(self, args: Sequence[str]) -> str | None:
        self._log("message:" + ",".join(args))
        if args[0] == "event":
            self.ctx.event()
            return None
        return f"{self.tag} got {' '.join(args)}"

    def presuspend(self) -> None:
        self._log("presuspend")

    def postsuspend(self) -> None:
        self._log("postsuspend")

    def preresume(self) -> None:
        self._log("preresume")
        if self.tag == "refuse-resume":
            raise InvalidArgument("not now")

    def resume(self) -> None:
        self._log("resume")

    def destroy(self) -> None:
        self._log("destroy")


@pytest.fixture
def eng():
    e = Engine()
    e.register_target(Recorder)
    Recorder.calls = []
    try:
        yield e
    finally:
        e.close()


def test_registered_target_in_targets(eng):
    assert eng.targets()["recorder"] == (9, 8, 7)
    assert eng.targets()["linear"] == (1, 5, 0)


def test_unknown_target_type(eng):
    with pytest.raises(TargetNotSupported):
        eng.create("x", "0 8 nonesuch 1 2")
    assert not eng.exists("x")


def test_typed_target_under_another_name_is_refused(eng):
    """A typed target registered under a name ``Table.parse`` does not know gets a generic value,
    not its own: the default ``build`` refuses it and nothing is created."""
    from dmtools.engine.basic_targets import LinearTarget

    eng.register_target(LinearTarget, "linear-alias")
    with pytest.raises(InvalidTable, match="linear-alias: expected a Linear value, not GenericTarget"):
        eng.create("x", "0 8 linear-alias /dev/null 0")
    assert not eng.exists("x")


def test_hooks_order_on_swap(eng):
    eng.create("x", "0 8 recorder a")
    eng.load("x", "0 8 recorder b")
    Recorder.calls.clear()
    eng.resume("x")
    assert Recorder.calls == [
        ("presuspend", "a"), ("postsuspend", "a"),
        ("preresume", "b"), ("resume", "b"), ("destroy", "a"),  # do_resume: old table last
    ]


def test_load_replaces_inactive_and_destroys_it(eng):
    eng.create("x", "0 8 recorder a")
    eng.load("x", "0 8 recorder b")
    Recorder.calls.clear()
    eng.load("x", "0 8 recorder c")
    assert Recorder.calls == [("destroy", "b")]
    assert eng.table_text("x", inactive=True) == "0 8 recorder c"


def test_failed_construct_destroys_the_built_targets(eng):
    eng.create("x")
    with pytest.raises(InvalidTable, match="refused"):
        eng.load("x", "0 8 recorder a\n8 8 recorder refuse-construct")
    assert ("destroy", "a") in Recorder.calls
    assert not eng.info("x").inactive_table


def test_preresume_refusal_keeps_device_suspended(eng):
    eng.create("x", "0 8 recorder a")
    eng.load("x", "0 8 recorder refuse-resume")
    with pytest.raises(InvalidArgument):
        eng.resume("x")
    info = eng.info("x")
    assert info.suspended and info.live_table and not info.inactive_table


def test_message_routed_by_sector(eng):
    eng.create("x", "0 8 recorder a\n8 8 recorder b")
    assert eng.message("x", 3, "hello  world") == "a got hello world"
    assert eng.message("x", 8, "ping") == "b got ping"
    with pytest.raises(InvalidArgument):
        eng.message("x", 16, "ping")
    with pytest.raises(InvalidArgument):
        eng.message("x", 0, "   ")


def test_target_event_wakes_waiter(eng):
    eng.create("x", "0 8 recorder a")
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(eng.wait_event("x", 0, timeout=10)))
    t.start()
    eng.message("x", 0, "event")
    t.join(10)
    assert got == [1]
    assert eng.info("x").event_nr == 1
    assert eng.wait_event("x", 5, timeout=0) == 1  # already different: returns at once


def test_wait_event_times_out_with_current_number(eng):
    eng.create("x", "0 8 zero")
    assert eng.wait_event("x", 0, timeout=0.05) == 0


def test_status_and_inactive_status(eng):
    eng.create("x", "0 8 recorder a")
    eng.load("x", "0 4 recorder b")
    assert [str(s) for s in eng.status("x")] == ["0 8 recorder status-a"]
    assert [str(s) for s in eng.status("x", inactive=True)] == ["0 4 recorder status-b"]


def test_deferred_remove(eng):
    eng.create("x", "0 8 zero")
    ep = eng.open_endpoint("x")
    eng.remove("x", deferred=True)
    assert eng.info("x").deferred_remove
    ep.close()
    assert not eng.exists("x")


def test_cancel_deferred_remove(eng):
    eng.create("x", "0 8 zero")
    ep = eng.open_endpoint("x")
    eng.remove("x", deferred=True)
    eng.message("x", 0, "@cancel_deferred_remove")
    ep.close()
    assert eng.exists("x")


def test_remove_retry_waits_for_close(eng):
    eng.create("x", "0 8 zero")
    ep = eng.open_endpoint("x")
    timer = threading.Timer(0.3, ep.close)
    timer.start()
    eng.remove("x", retry=True)
    assert not eng.exists("x")
    timer.join()


def test_removed_device_endpoint_fails(eng):
    eng.create("x", "0 8 zero")
    ep = eng.open_endpoint("x")
    eng.remove("x", deferred=True)
    eng.close()  # forces the device away
    with pytest.raises(DeviceIOError):
        ep.readinto(bytearray(512), 0)
    ep.close()


def test_cycle_refused(eng, make_image):
    eng.create("a", "0 8 zero")
    eng.create("b", f"0 8 linear {eng.device_ref('a')} 0")
    with pytest.raises(InvalidTable, match="depend on itself"):
        eng.load("a", f"0 8 linear {eng.device_ref('b')} 0")
    with pytest.raises(InvalidTable):
        eng.load("a", f"0 8 linear {eng.device_ref('a')} 0")


def test_stacked_open_counts_follow_tables(eng):
    eng.create("low", "0 16 zero")
    ref = eng.device_ref("low")
    eng.create("up", f"0 8 linear {ref} 0")
    assert eng.info("low").open_count == 1
    eng.load("up", f"0 8 linear {ref} 8")
    assert eng.info("low").open_count == 2  # live and inactive tables each hold it
    eng.resume("up")
    assert eng.info("low").open_count == 1
    eng.load("up", "0 8 zero")
    eng.resume("up")
    assert eng.info("low").open_count == 0
    eng.remove("low")


def test_same_device_twice_in_one_table_is_one_handle(eng, make_image):
    img = make_image(MiB)
    eng.create("x", f"0 64 linear {img} 0\n64 64 linear {img} 64")
    table = eng._get("x", "t").live
    assert table is not None and len(table.context.handles) == 1
    eng.remove("x")


def test_readonly_table(eng, make_image):
    img = make_image(MiB)
    eng.create("x", f"0 64 linear {img} 0", readonly=True)
    assert eng.info("x").read_only
    with eng.open_endpoint("x") as ep:
        with pytest.raises(DeviceIOError) as exc:
            ep.write(b"\0" * 512, 0)
        assert exc.value.errno == errno.EROFS


def test_io_bounds(eng):
    eng.create("x", "0 8 zero")
    with eng.open_endpoint("x") as ep:
        buf = bytearray(8192)
        assert ep.readinto(buf, 0) == 4096
        assert ep.readinto(buf, 4096) == 0
        with pytest.raises(NoSpace):
            ep.write(b"x" * 1024, 3584)
        with pytest.raises(InvalidArgument):
            ep.readinto(buf, -512)


def test_error_target_fails_io(eng):
    eng.create("x", "0 8 zero\n8 8 error")
    with eng.open_endpoint("x") as ep:
        assert ep.readinto(bytearray(4096), 0) == 4096
        with pytest.raises(DeviceIOError):
            ep.readinto(bytearray(1024), 3584)


def test_striped_odd_geometry(eng, make_image):
    imgs = [make_image(MiB) for _ in range(3)]
    refs = " ".join(f"{p} 8" for p in imgs)
    eng.create("x", f"0 720 striped 3 24 {refs}")  # 3 stripes, 24-sector chunks (not powers of 2)
    data = bytes(range(256)) * (720 * 512 // 256)
    with eng.open_endpoint("x") as ep:
        ep.write(data, 0)
        back = bytearray(len(data))
        assert ep.readinto(back, 0) == len(data)
    assert bytes(back) == data
    chunk = 24 * 512
    for n in range(720 // 24):
        stripe, row = n % 3, n // 3
        with open(imgs[stripe], "rb") as f:
            f.seek(8 * 512 + row * chunk)
            assert f.read(chunk) == data[n * chunk : (n + 1) * chunk]


def test_table_object_accepted(eng):
    from dmtools.table import Table

    eng.create("x", Table.parse("0 8 zero\n8 8 error"))
    assert str(eng.table("x")) == "0 8 zero\n8 8 error"


def test_rename_conflict_and_missing(eng):
    eng.create("x", "0 8 zero")
    eng.create("y", "0 8 zero")
    from dmtools.errors import DeviceExists

    with pytest.raises(DeviceExists):
        eng.rename("x", "y")
    with pytest.raises(DeviceNotFound):
        eng.rename("nope", "z")


def test_uuid_unique(eng):
    from dmtools.errors import DeviceExists

    eng.create("x", "0 8 zero", uuid="U-1")
    with pytest.raises(DeviceExists):
        eng.create("y", "0 8 zero", uuid="U-1")
    assert eng.info("x").uuid == "U-1"
    assert [e.uuid for e in eng.list()] == ["U-1"]


def test_busy_remove_message(eng):
    eng.create("x", "0 8 zero")
    with eng.open_endpoint("x"):
        with pytest.raises(DeviceBusy):
            eng.remove("x")


def test_data_extents_follow_sparse_backing_files(eng, make_image):
    img = make_image(4 * MiB)
    with open(img, "r+b") as f:
        f.seek(MiB + 8192)
        f.write(b"d" * 4096)
    eng.create("x", f"0 2048 linear {img} 2048\n2048 2048 zero\n4096 16 error")
    with eng.open_endpoint("x") as ep:
        ext = ep.data_extents(0, 2048 * 512 * 2)
        assert ext is not None
        covered = [(o, n) for o, n in ext if n]
        # the data block at backing byte 1 MiB + 8 KiB is device byte 8 KiB; the zero target
        # holds nothing
        assert any(o <= 8192 < o + n for o, n in covered)
        assert all(o + n <= 2048 * 512 for o, n in covered)
        assert ep.data_extents(2048 * 512, 2048 * 512) == []
        assert ep.data_extents(4096 * 512, 16 * 512) is None  # error target cannot tell


class HeldExposure:
    """An exposure seam whose ``add`` waits until released (a loop device slow to attach)."""

    def __init__(self) -> None:
        self.adding = threading.Event()
        self.release = threading.Event()

    def add(self, dev: object) -> tuple[int, int]:
        self.adding.set()
        assert self.release.wait(30)
        return 7, 99

    def resized(self, dev: object) -> None:
        pass

    def close(self) -> None:
        pass


def test_device_is_invisible_until_its_create_numbered_it(eng):
    # A monitor scanning while the exposure attached the loop device saw the device as 0:-1, then
    # "removed" and "added" again as 7:N (tests/events/test_sigkill.py). The kernel numbers a
    # device before it can be found; the engine only reserves the name meanwhile.
    exposure = HeldExposure()
    eng._exposure = exposure
    done: list[object] = []
    creator = threading.Thread(target=lambda: done.append(eng.create("held", "0 8 zero")))
    creator.start()
    try:
        assert exposure.adding.wait(30)
        assert "held" not in [d.name for d in eng.list()]
        for look in (eng.info, eng.table, eng.status):
            with pytest.raises(DeviceNotFound):
                look("held")
        with pytest.raises(DeviceExists):
            eng.create("held", "0 8 zero")  # the name is taken all the same
    finally:
        exposure.release.set()
        creator.join(30)
    info = eng.info("held")
    assert done == [info] and (info.major, info.minor) == (7, 99) and not info.suspended
    assert [(d.name, d.major, d.minor) for d in eng.list()] == [("held", 7, 99)]
