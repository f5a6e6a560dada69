"""Root tier: engine devices exposed as block devices (FUSE + loop), and the daemon around them."""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from dmtools import loop
from dmtools.blockdev import BlockDevice, aligned_buffer
from dmtools.engine import Engine, TargetDriver
from dmtools.engine.client import open_userspace
from dmtools.engine.expose import FUSE_THREADS, mounted_at
from dmtools.errors import DeviceBusy, DeviceExists
from dmtools.testing.threads import run_together
from dmtools.linux import process_gone
from dmtools.testing.wait import wait_until

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture
def run_dir(tmp_path: Path) -> str:
    return str(tmp_path / "run")


def _loops_under(run_dir: str) -> list[str]:
    prefix = os.path.realpath(os.path.join(run_dir, "fuse")) + "/"
    return [d.path for d in loop.list_loops() if (d.backing_file or "").startswith(prefix)]


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_mkfs_mount_write_remount(exposed_engine, make_image, tmp_path, dm_name):
    img = make_image(64 * MiB)
    exposed_engine.create(dm_name, f"0 {64 * MiB // 512} linear {img} 0")
    dev = exposed_engine.device_path(dm_name)
    info = exposed_engine.info(dm_name)
    st = os.stat(dev)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (info.major, info.minor)
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, timeout=120)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True, timeout=60)
    try:
        assert exposed_engine.info(dm_name).open_count >= 1
        with pytest.raises(DeviceBusy):
            exposed_engine.remove(dm_name)
        payload = {f"f{i}.bin": os.urandom(100_000 + i) for i in range(20)}
        for name, data in payload.items():
            (mnt / name).write_bytes(data)
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    subprocess.run(["mount", dev, str(mnt)], check=True, timeout=60)
    try:
        for name, data in payload.items():
            assert (mnt / name).read_bytes() == data
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", dev], capture_output=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()
    exposed_engine.remove(dm_name)
    assert not os.path.lexists(dev)


def test_loop_and_endpoint_see_the_same_data(exposed_engine, make_image, dm_name):
    a, b = make_image(4 * MiB), make_image(4 * MiB)
    exposed_engine.create(dm_name, f"0 8192 striped 2 16 {a} 0 {b} 0")
    dev = exposed_engine.device_path(dm_name)
    pattern = os.urandom(MiB)
    buf = aligned_buffer(MiB)
    buf[:] = pattern
    with BlockDevice(dev, writable=True, direct=True) as bd:
        bd.write(buf, 2 * MiB)
    with exposed_engine.open_endpoint(dm_name) as ep:
        got = bytearray(MiB)
        assert ep.readinto(got, 2 * MiB) == MiB
        assert bytes(got) == pattern
        other = os.urandom(MiB)
        ep.write(other, 0)
    with BlockDevice(dev, direct=True) as bd:
        assert bd.readinto(buf, 0) == MiB
        assert bytes(buf) == other


def test_user_holding_loop_open_blocks_remove(exposed_engine, dm_name):
    exposed_engine.create(dm_name, "0 2048 zero")
    fd = os.open(exposed_engine.device_path(dm_name), os.O_RDONLY)
    try:
        assert exposed_engine.info(dm_name).open_count == 1
        with pytest.raises(DeviceBusy):
            exposed_engine.remove(dm_name)
    finally:
        os.close(fd)
    assert exposed_engine.info(dm_name).open_count == 0
    exposed_engine.remove(dm_name)


def test_resize_on_reload_reaches_the_loop_device(exposed_engine, make_image, dm_name):
    img = make_image(4 * MiB)
    exposed_engine.create(dm_name)
    dev = exposed_engine.device_path(dm_name)
    assert _blockdev_size(dev) == 0
    exposed_engine.load(dm_name, f"0 2048 linear {img} 0")
    exposed_engine.resume(dm_name)
    assert _blockdev_size(dev) == MiB
    exposed_engine.load(dm_name, f"0 8192 linear {img} 0")
    exposed_engine.resume(dm_name)
    assert _blockdev_size(dev) == 4 * MiB


def _blockdev_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def test_stacked_reference_to_own_loop_resolves_in_process(exposed_engine, make_image, dm_name):
    img = make_image(4 * MiB)
    exposed_engine.create(dm_name, f"0 8192 linear {img} 0")
    upper = "up" + dm_name
    # Name the lower device by its exposed path: the engine must not go through its own loop.
    exposed_engine.create(upper, f"0 4096 linear {exposed_engine.device_path(dm_name)} 2048")
    exposed_engine.suspend(dm_name)
    done = threading.Event()

    def writer() -> None:
        with exposed_engine.open_endpoint(upper) as ep:
            ep.write(b"\x42" * 4096, 0)
        done.set()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert not done.wait(0.3)  # held by the suspended lower device, in-process
    exposed_engine.resume(dm_name)
    assert done.wait(10)
    t.join(5)
    with open(img, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(4096) == b"\x42" * 4096
    exposed_engine.remove(upper)


def test_thousand_create_remove_cycles_leak_nothing(run_dir, make_image):
    img = make_image(MiB)
    gc.collect()  # descriptors of earlier tests' garbage must not close during the count
    threads0, fds0 = _threads(), _fds()
    eng = Engine(expose=True, run_dir=run_dir)
    try:
        eng.create("warm-dmtt", f"0 2048 linear {img} 0")
        eng.remove("warm-dmtt")
        gc.collect()
        threads1, fds1 = _threads(), _fds()
        for i in range(1000):
            name = f"c{i % 7}-dmtt"
            eng.create(name, f"0 2048 linear {img} 0")
            eng.remove(name)
        gc.collect()
        assert _fds() == fds1
        assert _threads() <= threads1 + FUSE_THREADS  # libfuse's bounded worker pool
        assert _loops_under(run_dir) == []
        assert os.listdir(os.path.join(run_dir, "mapper")) == []
    finally:
        eng.close()
    assert not mounted_at(os.path.join(run_dir, "fuse"))
    assert _loops_under(run_dir) == []
    wait_until(lambda: (_threads(), _fds()) == (threads0, fds0),
               lambda: f"threads and fds {(_threads(), _fds())} back to {(threads0, fds0)}")


def test_daemon_killed_is_restarted_cleanly(run_dir, make_image):
    img = make_image(4 * MiB)
    client = open_userspace(run_dir)
    try:
        client.create("k-dmtt", f"0 8192 linear {img} 0")
        assert os.path.exists(client.device_path("k-dmtt"))
        pid = client.ping()["pid"]
    finally:
        client.close()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process_gone(pid), f"pid {pid} to exit")
    assert _loops_under(run_dir)  # the killed daemon left its loop device behind
    client = open_userspace(run_dir)
    try:
        assert client.ping()["pid"] != pid
        assert client.list() == []
        assert _loops_under(run_dir) == []
        assert not os.path.lexists(os.path.join(run_dir, "mapper", "k-dmtt"))
        client.create("k-dmtt", f"0 8192 linear {img} 0")
        assert client.info("k-dmtt").live_table
        client.remove("k-dmtt")
        client.shutdown()
    finally:
        client.close()
    assert not mounted_at(os.path.join(run_dir, "fuse"))


def test_shutdown_returns_once_the_daemon_process_is_gone(run_dir, make_image):
    """The verb answers before the daemon has removed its devices and exposures and exited; the
    call waits for its exit, so a daemon started at once does not race it."""
    img = make_image(MiB)
    client = open_userspace(run_dir)
    try:
        client.create("s-dmtt", f"0 2048 linear {img} 0")
        pid = client.shutdown()
    finally:
        client.close()
    assert process_gone(pid)
    assert _loops_under(run_dir) == [] and not mounted_at(os.path.join(run_dir, "fuse"))
    assert not os.path.exists(os.path.join(run_dir, "daemon.pid"))
    client = open_userspace(run_dir)
    try:
        assert client.ping()["pid"] != pid and client.list() == []
        assert process_gone(client.shutdown())
    finally:
        client.close()


def test_two_clients_racing_on_one_name(run_dir):
    first = open_userspace(run_dir)
    second = open_userspace(run_dir)
    results: list[object] = []

    def go(client) -> None:
        try:
            client.create("race-dmtt", "0 2048 zero")
            results.append("ok")
        except DeviceExists as err:
            results.append(err)

    try:
        run_together([functools.partial(go, c) for c in (first, second)], timeout=30)
        assert sorted(type(r).__name__ for r in results) == ["DeviceExists", "str"]
        first.remove("race-dmtt")
        first.shutdown()
    finally:
        first.close()
        second.close()


def test_client_crash_mid_call_leaves_daemon_serving(run_dir):
    client = open_userspace(run_dir)
    try:
        client.create("w-dmtt", "0 8 zero")
        code = (
            "import sys; from dmtools.engine.client import UserspaceClient\n"
            f"c = UserspaceClient({run_dir!r})\n"
            "print('waiting', flush=True)\n"
            "c.call('wait_event', name='w-dmtt', event_nr=0, timeout=60)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"waiting\n"
        time.sleep(0.2)
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        assert client.info("w-dmtt").live_table
        client.remove("w-dmtt")
        assert client.list() == []
        client.shutdown()
    finally:
        client.close()


def test_daemon_clears_exposures_of_a_killed_in_process_engine(run_dir, make_image):
    img = make_image(MiB)
    code = (
        "import sys, time\n"
        "from dmtools.engine import Engine\n"
        f"e = Engine(expose=True, run_dir={os.path.join(run_dir, 'engine-') !r} + str(__import__('os').getpid()))\n"
        f"e.create('orphan-dmtt', '0 2048 linear {img} 0')\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"up\n"
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    orphan = os.path.join(run_dir, f"engine-{proc.pid}")
    prefix = os.path.realpath(os.path.join(orphan, "fuse")) + "/"
    assert any((d.backing_file or "").startswith(prefix) for d in loop.list_loops())
    client = open_userspace(run_dir)
    try:
        assert not os.path.exists(orphan)
        assert not any((d.backing_file or "").startswith(prefix) for d in loop.list_loops())
        client.shutdown()
    finally:
        client.close()


def test_readonly_table_makes_the_block_device_read_only(exposed_engine, make_image, dm_name):
    img = make_image(MiB)
    exposed_engine.create(dm_name, f"0 2048 linear {img} 0", readonly=True)
    dev = exposed_engine.device_path(dm_name)
    with open(f"/sys/block/{os.path.basename(os.path.realpath(dev))}/ro") as f:
        assert f.read().strip() == "1"
    exposed_engine.load(dm_name, f"0 2048 linear {img} 0")
    exposed_engine.resume(dm_name)
    with open(f"/sys/block/{os.path.basename(os.path.realpath(dev))}/ro") as f:
        assert f.read().strip() == "0"


def test_discard_and_zeroout_reach_the_backing_file(exposed_engine, make_image, dm_name):
    img = make_image(4 * MiB, fill=b"\xee")
    exposed_engine.create(dm_name, f"0 {4 * MiB // 512} linear {img} 0")
    dev = exposed_engine.device_path(dm_name)
    subprocess.run(["blkdiscard", "-z", "-o", str(MiB), "-l", str(MiB), dev], check=True, timeout=60)
    subprocess.run(["blkdiscard", "-o", str(2 * MiB), "-l", str(MiB), dev], check=True, timeout=60)
    with open(img, "rb") as f:
        data = f.read()
    assert data[:MiB] == b"\xee" * MiB
    assert data[MiB : 3 * MiB] == bytes(2 * MiB)  # zeroed, then punched (reads back zeros)
    assert data[3 * MiB :] == b"\xee" * MiB


def test_io_errors_reach_the_block_device_as_eio(exposed_engine, dm_name, capfd):
    exposed_engine.create(dm_name, "0 2048 zero\n2048 2048 error")
    fd = os.open(exposed_engine.device_path(dm_name), os.O_RDONLY | os.O_DIRECT)
    try:
        buf = aligned_buffer(4096)
        assert os.preadv(fd, [buf], 0) == 4096
        with pytest.raises(OSError) as exc:
            os.preadv(fd, [buf], 2048 * 512)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    assert "Traceback" not in capfd.readouterr().err  # an I/O error is not a crash


def test_sigterm_still_ends_a_process_with_an_exposed_engine(tmp_path, make_image):
    img = make_image(MiB)
    code = (
        "import time\n"
        "from dmtools.engine import Engine\n"
        f"e = Engine(expose=True, run_dir={str(tmp_path / 'run')!r})\n"
        f"e.create('t-dmtt', '0 2048 linear {img} 0')\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM
    from dmtools.engine.expose import clear_stale

    clear_stale(str(tmp_path / "run"))  # what a daemon start would do after such a death
    assert _loops_under(str(tmp_path / "run")) == []


class _Memory(TargetDriver):
    """A RAM-backed target with the base class's discard (a no-op hint) and zero."""

    name = "memory-test"
    version = (1, 0, 0)

    def __init__(self, ctx, start, length, args):  # type: ignore[no-untyped-def]
        super().__init__(ctx, start, length, args)
        self.data = bytearray(b"\xab" * (length * 512))

    def read(self, buf, offset):  # type: ignore[no-untyped-def]
        buf[:] = self.data[offset : offset + len(buf)]

    def write(self, buf, offset):  # type: ignore[no-untyped-def]
        self.data[offset : offset + len(buf)] = buf

    def table_params(self) -> str:
        return ""


def test_punched_holes_read_back_as_zeros_on_any_target(exposed_engine, dm_name):
    exposed_engine.register_target(_Memory)
    exposed_engine.create(dm_name, "0 8192 memory-test")
    dev = exposed_engine.device_path(dm_name)
    subprocess.run(["blkdiscard", "-o", str(MiB), "-l", str(MiB), dev], check=True, timeout=60)
    with exposed_engine.open_endpoint(dm_name) as ep:
        got = bytearray(2 * MiB)
        ep.readinto(got, 0)
    assert bytes(got[:MiB]) == b"\xab" * MiB
    assert bytes(got[MiB:]) == bytes(MiB)



def _kernel_stack(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stack") as f:
            return f.read()
    except OSError:
        return ""


@contextlib.contextmanager
def _sync_waiting_for(eng: Engine, name: str) -> Iterator[int]:
    """Yield a descriptor of ``name``'s loop device holding a write in its page cache, the device
    suspended and ``sync(2)`` waiting for that write while it holds the disk's ``open_mutex``: an
    open of the device made in a child waits (a child that opens it while the sync still waits for
    other devices ends, and the next one looks again). After the block the sync and the children
    must end; if they still wait, our FUSE connection is aborted so that nothing hangs."""
    path = eng.device_path(name)
    fd = os.open(path, os.O_RDWR)
    procs: list[subprocess.Popen[bytes]] = []

    def open_waits() -> bool:
        if "sync_bdevs" not in _kernel_stack(procs[0].pid):
            return False
        if procs[-1].poll() is not None:
            procs.append(subprocess.Popen(["sh", "-c", ': < "$0"', path]))
        return "bdev_open" in _kernel_stack(procs[-1].pid)

    try:
        os.pwrite(fd, b"s" * 8192, 64 * 1024)
        eng.suspend(name)
        procs.append(subprocess.Popen(["sync"]))
        procs.append(subprocess.Popen(["true"]))
        wait_until(open_waits, "the sync to hold the device's open_mutex, waiting for its writeback", 60)
        yield fd
        assert [p.wait(30) for p in procs] == [0] * len(procs)
    finally:
        if any(p.poll() is None for p in procs):
            eng.exposure.abort()  # first: our close of the device would wait for the write too
            for p in procs:
                p.wait(30)
        os.close(fd)


def _returns(func: Callable[[], object], bound: float = 10.0) -> list[object]:
    """Run ``func`` on a thread; ``[result or exception]`` once it returned within ``bound``
    seconds, ``[]`` when it is still running then."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(func())
        except Exception as err:  # noqa: BLE001 - handed to the test
            out.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound)
    return out


def test_reload_resume_while_a_sync_waits_for_the_suspended_device(exposed_engine, make_image, dm_name):
    """``sync(2)`` waits for each block device's writeback holding the disk's ``open_mutex``
    (``sync_bdevs``); a write queued on a suspended device is such writeback. A resume that
    swaps in a table of the same size must not open the loop device before that write can land:
    the open waits for the mutex, the sync for the resume (a mirror guard's reload, dropping a
    failed leg while a write was held, hung so with another process's ``sync`` running)."""
    img = make_image(MiB)
    table = f"0 2048 linear {img} 0"
    exposed_engine.create(dm_name, table)
    with _sync_waiting_for(exposed_engine, dm_name):
        exposed_engine.load(dm_name, table)
        assert _returns(lambda: exposed_engine.resume(dm_name)) == [None], "the resume waited for the sync"
    with open(img, "rb") as f:
        f.seek(64 * 1024)
        assert f.read(8192) == b"s" * 8192


def test_remove_waiting_for_a_sync_lets_the_resume_through(exposed_engine, make_image, dm_name):
    """A ``remove`` counting the openers of a suspended device waits (its probe opens the loop
    device) until the writes that a ``sync(2)`` waits for land: it must not hold the device's lock
    meanwhile, or the resume that lets them land waits for it."""
    img = make_image(MiB)
    exposed_engine.create(dm_name, f"0 2048 linear {img} 0")
    with _sync_waiting_for(exposed_engine, dm_name):
        removal: list[object] = []

        def remove() -> None:
            try:
                exposed_engine.remove(dm_name)
            except DeviceBusy as err:
                removal.append(err)

        remover = threading.Thread(target=remove, daemon=True)
        remover.start()
        wait_until(lambda: "bdev_open" in _kernel_stack(remover.native_id or 0) or removal,
                   "the remove to probe the loop device", 30)
        assert _returns(lambda: exposed_engine.resume(dm_name)) == [None], "the resume waited for the remove"
        remover.join(60)
    assert len(removal) == 1 and isinstance(removal[0], DeviceBusy)  # our descriptor was open
    exposed_engine.remove(dm_name)


def test_info_of_a_suspended_device_a_sync_waits_for(exposed_engine, make_image, dm_name):
    """``info`` counts the openers of a suspended device without opening it: an open waits for
    the disk's ``open_mutex``, which a ``sync(2)`` waiting for the device's writes holds until the
    resume, so a client doing suspend, info, resume never got to the resume. The count is what the
    kernel's would be: our descriptor (the children waiting in ``bdev_open`` hold no open yet)."""
    img = make_image(MiB)
    exposed_engine.create(dm_name, f"0 2048 linear {img} 0")
    with _sync_waiting_for(exposed_engine, dm_name):
        got = _returns(lambda: exposed_engine.info(dm_name))
        assert got, "info waited for the sync"
        assert got[0].suspended and got[0].open_count == 1
        exposed_engine.resume(dm_name)
    assert exposed_engine.info(dm_name).open_count == 0


def test_a_table_load_waiting_for_a_suspended_device_holds_no_other_count(exposed_engine, make_image, dm_name):
    """A table over an exposed device claims its block device with an ``O_EXCL`` open, which waits
    (as the kernel's ``dm_get_device`` does) while a ``sync(2)`` waits for the suspended device:
    that wait must hold nothing the device's own ``info`` and resume, or another claim, need."""
    img, other = make_image(MiB), make_image(MiB)
    exposed_engine.create(dm_name, f"0 2048 linear {img} 0")
    upper = "up" + dm_name
    with _sync_waiting_for(exposed_engine, dm_name):
        creating = threading.Thread(target=exposed_engine.create,
                                    args=(upper, f"0 1024 linear {exposed_engine.device_path(dm_name)} 0"), daemon=True)
        creating.start()
        wait_until(lambda: "bdev_open" in _kernel_stack(creating.native_id or 0), "the load to open the device", 30)
        got = _returns(lambda: exposed_engine.info(dm_name))
        assert got and got[0].open_count == 1, "info waited for the load"  # our descriptor
        assert _returns(lambda: exposed_engine.create("other" + dm_name, f"0 2048 linear {other} 0")) != []
        assert _returns(lambda: exposed_engine.resume(dm_name)) == [None]
        creating.join(30)
    assert not creating.is_alive()
    assert exposed_engine.info(dm_name).open_count == 1  # the table over it
    for name in (upper, "other" + dm_name):
        exposed_engine.remove(name)


def test_an_abort_lets_a_waiting_sync_end_and_spares_a_live_exposure(exposed_engine, make_image, dm_name, tmp_path):
    """Aborting a FUSE connection (``Exposure.abort``, the last resort; or an admin's write to its
    ``abort`` file) fails the writes its loop device holds, so a ``sync(2)`` waiting for them ends
    at once; the loop device stays attached, every later I/O failing, until the device goes. Another
    engine's exposure, live, keeps its loop device and serves I/O."""
    img, img2 = make_image(MiB), make_image(MiB)
    exposed_engine.create(dm_name, f"0 2048 linear {img} 0")
    with Engine(expose=True, run_dir=str(tmp_path / "live")) as live:
        live.create("live-dmtt", f"0 2048 linear {img2} 0")
        live_path = os.path.realpath(live.device_path("live-dmtt"))
        with _sync_waiting_for(exposed_engine, dm_name) as fd:
            assert exposed_engine.exposure.abort()
            start = time.monotonic()
        assert time.monotonic() - start < 10, "the sync and the openers waited after the abort"
        dead = os.open(exposed_engine.device_path(dm_name), os.O_RDWR | os.O_DIRECT)
        try:
            with pytest.raises(OSError):
                os.pwrite(dead, aligned_buffer(4096), 0)
        finally:
            os.close(dead)
        assert live_path in _loops_under(str(tmp_path / "live"))
        buf = aligned_buffer(4096)
        buf[:] = b"L" * 4096
        with BlockDevice(live_path, writable=True, direct=True) as bd:
            bd.write(buf, 8192)
        with open(img2, "rb") as f:
            f.seek(8192)
            assert f.read(4096) == b"L" * 4096
    exposed_engine.resume(dm_name)
    exposed_engine.remove(dm_name)


def test_a_claim_probing_a_suspended_exposed_device_holds_no_other_count(exposed_engine, make_image, dm_name,
                                                                          tmp_path):
    """A table of another engine over this engine's FUSE file claims the file and probes the loop
    device over it with an ``O_EXCL`` open, which waits while a ``sync(2)`` waits for the device
    suspended: that engine's ``info`` of another device must not wait for it (the holder's lock)."""
    img, other = make_image(MiB), make_image(MiB)
    exposed_engine.create(dm_name, f"0 2048 linear {img} 0")
    loop_name = os.path.basename(os.path.realpath(exposed_engine.device_path(dm_name)))
    fuse_file = Path(f"/sys/block/{loop_name}/loop/backing_file").read_text().strip()
    second = Engine(expose=True, run_dir=str(tmp_path / "second"))
    try:
        second.create("b" + dm_name, f"0 2048 linear {other} 0")
        with _sync_waiting_for(exposed_engine, dm_name):
            creating = threading.Thread(target=second.create,
                                        args=("c" + dm_name, f"0 1024 linear {fuse_file} 0"), daemon=True)
            creating.start()
            wait_until(lambda: "bdev_open" in _kernel_stack(creating.native_id or 0),
                       "the claim to probe the loop device", 30)
            got = _returns(lambda: second.info("b" + dm_name))
            assert got and got[0].open_count == 0, "info waited for the probe"
            assert _returns(lambda: exposed_engine.resume(dm_name)) == [None]
            creating.join(30)
        assert not creating.is_alive()
        assert [e.name for e in second.list()] == sorted(["b" + dm_name, "c" + dm_name])
        for name in ("c" + dm_name, "b" + dm_name):
            second.remove(name)
    finally:
        second.close()
