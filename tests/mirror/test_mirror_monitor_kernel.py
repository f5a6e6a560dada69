"""Kernel tier (run: scripts/vmtest): a kernel mirror made by ``mirror create`` is monitored from
creation. A leg fails under writes in flight (its ``linear`` device reloaded with ``error``):
dm-raid1 with ``handle_errors`` holds the writes, the monitor ``mirror create`` started drops the
failed leg, the writes complete, the data is intact on the leg that remains, the action is in the
monitor's journal and log, and the monitor exits when the mirror is removed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from dmtools.blockdev import BlockDevice, aligned_buffer
from dmtools.cli import main as cli_main
from dmtools.errors import DMError
from dmtools.events.store import StateStore
from dmtools.status import parse_mirror_status
from dmtools.testing.wait import wait_until
from mirror.monitor import state_root
from test_mirror_kernel import SECTORS, SIZE, _loops, _read
from test_mirror_monitor import policy_actions

pytestmark = pytest.mark.kernel

BLOCK = 65536
WRITES = 48
#: seconds for a held write to be released (a monitor's poll plus a reload, in an emulated VM)
WAIT = 90.0


def kcli(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main.main(["--backend", "kernel", *argv])
    return rc, err.getvalue()


def _monitor_gone(name: str) -> bool:
    """True once no monitor holds the mirror's state directory (its lock goes with the process)."""
    try:
        StateStore("kernel", state_root(name), lock=True).close()
    except DMError:
        return False
    return True


@pytest.mark.parametrize("bad", [1, 0], ids=["second-leg", "primary"])
def test_monitor_drops_a_failed_leg_and_held_writes_complete(kernel_dm: Any, make_image: Any, make_loop: Any,
                                                             kernel_tag: str, bad: int) -> None:
    data = os.urandom(SIZE)
    legs = _loops(make_image, make_loop, 2)
    for leg in legs:
        with open(leg, "r+b") as f:
            f.write(data)
    name, under = f"{kernel_tag}-m-dmtt", f"{kernel_tag}-bad-dmtt"
    kernel_dm.create(under, f"0 {SECTORS} linear {legs[bad]} 0")
    refs = [kernel_dm.device_path(under) if i == bad else leg for i, leg in enumerate(legs)]
    rc, err = kcli("mirror", "create", name, *refs, "--region-size", "64K", "--nosync")
    assert rc == 0, err
    assert not _monitor_gone(name)  # started by the command, and holding its state directory
    path = kernel_dm.device_path(name)
    blocks = [os.urandom(BLOCK) for _ in range(WRITES)]
    started, done = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    written = [0]

    def writer() -> None:
        buf = aligned_buffer(BLOCK)
        try:
            with BlockDevice(path, writable=True, direct=True) as dev:
                for i, block in enumerate(blocks):
                    buf[:] = block
                    dev.write(buf, i * 2 * BLOCK)
                    written[0] = i + 1
                    if i == 3:
                        started.set()
                dev.flush()
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)
        started.set()
        done.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    assert started.wait(WAIT)
    kernel_dm.load(under, f"0 {SECTORS} error")  # the leg fails under the writes in flight
    kernel_dm.resume(under)
    assert done.wait(WAIT), f"writes still held after {WAIT} s ({written[0]}/{WRITES} done)"
    thread.join(WAIT)
    assert not errors, errors
    assert written[0] == WRITES
    # the failed leg was dropped: a linear device over the leg that remains
    table = kernel_dm.table(name)
    keep = legs[1 - bad]
    st = os.stat(keep)
    assert [ln.target.target_type for ln in table.lines] == ["linear"]
    assert table.lines[0].target.device == f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    expect = bytearray(data)
    for i, block in enumerate(blocks):
        expect[i * 2 * BLOCK:(i * 2 + 1) * BLOCK] = block
    assert _read(keep) == bytes(expect)
    assert _read(path) == bytes(expect)
    # what the monitor did is in its journal, its events file and its log
    root = Path(state_root(name))
    actions = policy_actions(root, "mirror-remove", WAIT)
    assert len(actions) == 1 and actions[0]["ok"], actions
    assert f"legs {bad} " in actions[0]["detail"] and "dropped" in actions[0]["detail"]
    assert "dropped" in (root / "monitor.log").read_text()
    kernel_dm.remove(name, retry=True)
    wait_until(lambda: _monitor_gone(name), "the monitor to exit after the mirror was removed", WAIT)


def test_monitor_ends_held_writes_when_the_failed_source_holds_the_only_copy(
        kernel_dm: Any, make_image: Any, make_loop: Any, kernel_tag: str) -> None:
    """The source leg fails during the initial resync: the regions not copied exist nowhere else,
    so no leg can be dropped. dm-raid1 holds the writes to them; the monitor ends each with EIO
    (a plain suspend and resume), again for the next one, and keeps the mirror for a repair."""
    legs = _loops(make_image, make_loop, 2, data=os.urandom(SIZE))
    name, under = f"{kernel_tag}-m-dmtt", f"{kernel_tag}-src-dmtt"
    kernel_dm.create(under, f"0 {SECTORS} error")  # the source fails every read of the resync
    rc, err = kcli("mirror", "create", name, kernel_dm.device_path(under), legs[1], "--region-size", "64K")
    assert rc == 0, err
    path = kernel_dm.device_path(name)
    for attempt in range(2):  # the second write comes after the monitor's first action
        result: list[BaseException | None] = []
        done = threading.Event()

        def writer() -> None:
            buf = aligned_buffer(BLOCK)
            buf[:] = os.urandom(BLOCK)
            try:
                with BlockDevice(path, writable=True, direct=True) as dev:
                    dev.write(buf, (attempt + 3) * BLOCK)
                result.append(None)
            except (OSError, DMError) as exc:
                result.append(exc)
            done.set()

        threading.Thread(target=writer, daemon=True).start()
        assert done.wait(WAIT), f"write {attempt} still held after {WAIT} s"
        assert result[0] is not None and getattr(result[0], "errno", None) == errno.EIO, result
    table = kernel_dm.table(name)
    assert [ln.target.target_type for ln in table.lines] == ["mirror"]  # kept for a repair
    health = parse_mirror_status(kernel_dm.status(name)[0].params).health
    assert health[0] == "S", health  # leg 0 failed its resync (dm-raid1's letter)
    actions = policy_actions(Path(state_root(name)), "mirror-remove", WAIT)
    assert not actions[0]["ok"] and "EIO" in actions[0]["detail"], actions
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main.main(["--backend", "kernel", "mirror", "status", name]) == 0
    assert "source leg 0 failed out of sync" in out.getvalue()  # the monitor's journal, shown
    kernel_dm.remove(name, retry=True)
    wait_until(lambda: _monitor_gone(name), "the monitor to exit after the mirror was removed", WAIT)


def test_create_refuses_a_spare_that_is_a_leg_or_the_log(kernel_dm: Any, make_image: Any, make_loop: Any,
                                                        kernel_tag: str) -> None:
    legs = _loops(make_image, make_loop, 3)
    log = legs.pop()
    name = f"{kernel_tag}-spare"
    for spare in (legs[1], log):
        rc, err = kcli("mirror", "create", name, *legs, "--log", log, "--region-size", "64K", "--spare", spare)
        assert rc == 1 and ("share bytes" in err or "same bytes" in err) and err.count("\n") == 1, err
        assert not kernel_dm.exists(name)
