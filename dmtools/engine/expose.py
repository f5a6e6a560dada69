"""Engine devices as real block devices: one FUSE file per device, attached to a loop device.

One FUSE file system (``mfusepy`` over Debian's libfuse3, multi-threaded) is mounted at
``<run_dir>/fuse``; each engine device is a file there, bound to a loop device, and
``<run_dir>/mapper/NAME`` links to that loop device (the analogue of ``/dev/mapper/NAME``). The
device's ``major:minor`` is the loop device's.

Requests to a device whose live table is only ``linear``/``striped`` over backing files are
served in C, without the GIL (``dmtools.engine.fastpath``: each file's FUSE handle names its slot,
whose map the device's suspend gate withdraws and installs), by the FUSE session's own workers
(``fastio.c``'s ``dmf_main``), which receive a write's data on a page boundary and pass it to the
backing file with ``O_DIRECT`` as it lies there. Everything else runs in Python:
writes go straight from libfuse's request buffer to the engine (no copy in Python, no per-sector
loop): the FUSE callback wraps the C buffer in a ``memoryview`` and hands it to the device, whose
targets ``pwritev`` it. Reads of ``linear`` and ``striped`` ranges are moved by the kernel: the
targets splice the backing file's pages into a pipe that libfuse splices into the reply
(``dmtools.engine.fuse_io``); other targets read into a buffer. Files are served with FUSE
``direct_io`` (no second page cache under the loop device), and the loop device uses direct I/O
where the kernel allows it, so several requests are in flight at once over the FUSE threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import signal
import stat
import struct
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar, cast

from dmtools import loop
from dmtools.engine import fastpath, fuse_io, openers, rundir
from dmtools.errors import DMError, LoopError
from dmtools.linux import BLKROSET, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, SYS_BLOCK, libc, mounts, sysfs_attr

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.device import Device
    from dmtools.engine.engine import Engine

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = rundir.ROOT_RUN_DIR
#: Where the kernel's fusectl file system lists FUSE connections.
FUSECTL_DIR = "/sys/fs/fuse/connections"
MNT_DETACH = 2
#: FUSE worker threads (libfuse's ``max_threads``): requests served in parallel. As many as fio's
#: queue depth 16: with 8, half of a deep queue of small requests waited for a worker.
FUSE_THREADS = 16
#: How long a removed device's C slot waits for its requests in flight (a hung backing device):
#: after that the slot stays taken, unused, until the FUSE session ends.
FAST_SLOT_WAIT = 5.0
#: How long ``close`` waits for the FUSE thread after a lazy unmount (its session lasts while a
#: loop device someone holds open still refers to a file; process exit ends it).
FUSE_JOIN_BUSY = 1.0

def exposure_possible() -> str | None:
    """``None`` when devices can be exposed here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "exposure needs root"
    for path in ("/dev/fuse", "/dev/loop-control"):
        if not os.path.exists(path):
            return f"exposure needs {path}"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as err:
        return f"exposure needs mfusepy and libfuse3: {err}"
    return None


def _umount(path: str, flags: int = 0) -> int:
    """``umount2``; returns 0 or the errno."""
    if libc().umount2(os.fsencode(path), flags) != 0:
        return ctypes.get_errno()
    return 0


def _mount_entry(path: str) -> tuple[str, str, str, str] | None:
    """The :func:`~dmtools.linux.mounts` entry of what is mounted at ``path`` (works for dead FUSE
    mounts too: nothing asks the file system), or ``None``."""
    real = os.path.realpath(path)
    return next((m for m in mounts() if m[1] == real), None)


def mounted_at(path: str) -> bool:
    """True when something is mounted at ``path`` (works for dead FUSE mounts too)."""
    return _mount_entry(path) is not None


def fuse_connection(mount_dir: str) -> int | None:
    """The FUSE connection number (the mount's device minor) of the file system at ``mount_dir``,
    ``None`` when nothing is mounted there."""
    mount = _mount_entry(mount_dir)
    try:
        return None if mount is None else int(mount[0].split(":")[1])
    except (ValueError, IndexError):
        return None


def abort_fuse(mount_dir: str) -> bool:
    """Abort the FUSE connection at ``mount_dir``: every pending and later request fails.

    The last resort when our own FUSE server cannot answer (a thread waiting, in the kernel, for
    I/O that only the server would complete): the kernel's ``abort`` file of the connection
    (Documentation/filesystems/fuse.rst, "Aborting a filesystem connection"). fusectl is mounted
    at ``/sys/fs/fuse/connections`` when it is not (systemd mounts it at boot elsewhere).
    Returns True when the connection was aborted.
    """
    conn = fuse_connection(mount_dir)
    if conn is None:
        return False
    ctl = f"{FUSECTL_DIR}/{conn}/abort"
    if not os.path.exists(ctl) and not mounted_at(FUSECTL_DIR):
        libc().mount(b"fusectl", os.fsencode(FUSECTL_DIR), b"fusectl", 0, None)
    try:
        with open(ctl, "w") as f:
            f.write("1")
    except OSError as err:
        log.error("cannot abort FUSE connection %d of %s: %s", conn, mount_dir, err)
        return False
    return True


def clear_stale(run_dir: str = DEFAULT_RUN_DIR) -> list[str]:
    """Undo the exposures a killed engine left behind; returns what was cleared.

    Detaches loop devices backed by files under ``<run_dir>/fuse`` (deferred by the kernel while a
    user still holds one open), unmounts that FUSE mount and removes the ``mapper`` links.
    """
    cleared: list[str] = []
    mount_dir = os.path.join(run_dir, "fuse")
    if os.path.islink(run_dir) or os.path.islink(mount_dir):
        return cleared  # not our exposure: unmounting would follow the link
    prefix = os.path.realpath(mount_dir) + "/"
    for dev in loop.list_loops():
        backing = dev.backing_file or ""
        if backing.startswith(prefix):
            with contextlib.suppress(DMError):
                loop.detach(dev, timeout=2.0)
                cleared.append(dev.path)
    if mounted_at(mount_dir):
        err = _umount(mount_dir)
        if err:
            err = _umount(mount_dir, MNT_DETACH)
        if not err:
            cleared.append(mount_dir)
    mapper = os.path.join(run_dir, "mapper")
    if os.path.isdir(mapper) and not os.path.islink(mapper):
        for entry in os.listdir(mapper):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(mapper, entry))
                cleared.append(os.path.join(mapper, entry))
    return cleared


def clear_dead_engines(run_dir: str = DEFAULT_RUN_DIR) -> list[str]:
    """Clear the exposures of in-process engines (``<run_dir>/engine-PID``) whose process is gone."""
    cleared: list[str] = []
    try:
        entries = os.listdir(run_dir)
    except OSError:
        return cleared
    for entry in entries:
        if not entry.startswith("engine-") or not entry[7:].isdigit():
            continue
        try:
            os.kill(int(entry[7:]), 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        path = os.path.join(run_dir, entry)
        cleared += clear_stale(path)
        for sub in ("mapper", "fuse", ""):
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(path, sub) if sub else path)
    return cleared


def _die_by(signum: int, frame: Any) -> None:
    """Do what the default action of ``signum`` would have done: end the process by it."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _keep_default_signals() -> None:
    """Stop libfuse from taking over SIGTERM/SIGHUP while a FUSE loop runs in this process.

    libfuse installs its own handlers (which only end the FUSE loop) for signals still at their
    default action; a stand-in with the default's effect keeps ``kill``/``timeout`` ending the
    process. Only the main thread may set handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _die_by)


def _loop_size_and_ro(lo: loop.LoopDevice) -> tuple[int, bool] | None:
    """A loop device's size in bytes and read-only flag, read from sysfs (the device is not
    opened); ``None`` when they cannot be read."""
    base = f"{SYS_BLOCK}/loop{lo.number}"
    size, ro = sysfs_attr(f"{base}/size"), sysfs_attr(f"{base}/ro")
    return None if size is None or ro is None or not size.isdigit() else (int(size) * 512, ro == "1")


def udev_settle() -> None:
    """Wait for udev to finish probing new or changed loop devices (when udevd runs).

    udev's probes open the device for a moment; settling keeps them from showing up as openers
    right after ``create`` or ``resume`` (libdevmapper waits on udev cookies for the same reason).
    """
    if not os.path.exists("/run/udev/control"):
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["udevadm", "settle", "--timeout=10"], check=False, timeout=15, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass
class Exposed:
    """Exposure state of one device."""

    file: str
    loop: loop.LoopDevice
    link: str


F = TypeVar("F", bound=Callable[..., Any])


def _errno(func: F) -> F:
    """Turn engine errors into ``OSError`` with their errno, which mfusepy returns to the kernel."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DMError as err:
            raise OSError(err.errno or errno.EIO, err.message) from err

    return cast(F, wrapper)


class _Operations:
    """The FUSE file system: a flat directory with one file per exposed device."""

    use_ns = True

    def __init__(self, files: dict[str, "Device"], ready: threading.Event) -> None:
        self.files = files
        self.ready = ready
        self.started = time.time_ns()
        #: each FUSE worker's pipe for read replies (``fuse_io``).
        self.pipes = fuse_io.ReadPipes()
        #: files being bound to a loop device while their device is still empty: they report
        #: one sector, because ``dmtools.loop.attach`` refuses an empty file (the kernel does not).
        self.attaching: set[str] = set()
        #: each file's FUSE handle: its slot in the C data path (``dmtools.engine.fastpath``).
        self.handles: dict[str, int] = {}

    def _dev(self, path: str | None) -> "Device":
        dev = self.files.get((path or "").lstrip("/"))
        if dev is None:
            raise OSError(errno.ENOENT, "no such device")
        return dev

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            fuse_io.want_splice(conn)
        self.ready.set()

    def destroy(self, path: str) -> None:
        return None

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        t = self.started
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o700, "st_nlink": 2, "st_atime": t, "st_mtime": t, "st_ctime": t}
        dev = self._dev(path)
        size = dev.size
        if not size and path.lstrip("/") in self.attaching:
            size = 512
        return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": size,
                "st_blocks": (size + 511) // 512, "st_blksize": 1 << 20,
                "st_atime": t, "st_mtime": t, "st_ctime": t}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *list(self.files)]

    def open(self, path: str, flags: int) -> int:
        self._dev(path)
        return self.handles.get(path.lstrip("/"), 0)

    # ``write`` exists so that mfusepy wires the callback; ZeroCopyFUSE calls ``writefrom`` with
    # the kernel's buffer instead. Reads are ``read_buf`` (``fuse_io``).
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return self.writefrom(path, memoryview(data), offset)

    @_errno
    def writefrom(self, path: str | None, buf: memoryview, offset: int) -> int:
        return self._dev(path).write(buf, offset)

    @_errno
    def read_buf(self, path: str | None, bufpp: Any, size: int, offset: int) -> int:
        return fuse_io.read_buf(self._dev(path), self.pipes, bufpp, size, offset)

    @_errno
    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._dev(path).flush()
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        if length != self._dev(path).size:
            raise OSError(errno.EPERM, "device size is set by its table")
        return 0

    @_errno
    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        dev = self._dev(path)
        # The loop driver turns both DISCARD and WRITE_ZEROES (without NOUNMAP) into a punched
        # hole (lo_fallocate in drivers/block/loop.c), and a punched hole reads back as zeros:
        # so both modes must zero, not merely discard.
        if mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE):
            dev.zero(offset, size)
        else:
            raise OSError(errno.EOPNOTSUPP, "only punch-hole and zero-range")
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}


def _make_fuse_class() -> Any:
    """A ``mfusepy.FUSE`` whose write hands the C buffer to the device without copying, and whose
    read replies are pipes or buffers filled by the device (``fuse_io.read_buf``)."""
    import mfusepy

    class ZeroCopyFUSE(mfusepy.FUSE):  # type: ignore[misc]
        def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            view = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
            name = None if path is None else path.decode()
            return int(self.operations.writefrom(name, memoryview(view).cast("B"), offset))

        def read_buf(self, path: bytes | None, bufpp: Any, size: int, offset: int, fip: Any) -> int:
            name = None if path is None else path.decode()
            return int(self.operations.read_buf(name, bufpp, size, offset))

    return ZeroCopyFUSE


#: The exposures of this process's engines, by the real path of their FUSE mount point.
_LIVE: "weakref.WeakValueDictionary[str, Exposure]" = weakref.WeakValueDictionary()


def engine_serving(mount_dir: str) -> "Engine | None":
    """The engine of this process whose devices the FUSE mount at ``mount_dir`` serves, if any."""
    exposure = _LIVE.get(os.path.realpath(mount_dir))
    return exposure.engine if exposure is not None else None


class Exposure:
    """Serves an engine's devices as block devices (FUSE file + loop device + mapper link)."""

    def __init__(self, engine: "Engine", run_dir: str | None = None) -> None:
        reason = exposure_possible()
        if reason:
            raise DMError(reason, errno=errno.EPERM, operation="expose")
        self.engine = engine
        # An in-process engine gets its own directory, so it never meets the daemon's mount.
        self.run_dir = run_dir or os.path.join(DEFAULT_RUN_DIR, f"engine-{os.getpid()}")
        self.mount_dir = os.path.join(self.run_dir, "fuse")
        self.mapper_dir = os.path.join(self.run_dir, "mapper")
        self._files: dict[str, "Device"] = {}
        self._lock = threading.Lock()
        self._serial = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ops = _Operations(self._files, threading.Event())
        self._fast: fastpath.Session | None = None
        _LIVE[os.path.realpath(self.mount_dir)] = self

    # --- the FUSE mount ---------------------------------------------------------------------
    def _ensure_mounted(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        if os.path.dirname(self.run_dir) == DEFAULT_RUN_DIR:
            rundir.ensure(DEFAULT_RUN_DIR)  # an in-process engine's engine-PID: root's, 0700
        rundir.ensure(self.run_dir)
        rundir.subdir(self.mount_dir, 0o700)
        rundir.subdir(self.mapper_dir, 0o755)
        if mounted_at(self.mount_dir):
            raise DMError(f"{self.mount_dir} is already in use by another engine (a daemon "
                          "clears the exposures of dead ones when it starts)",
                          errno=errno.EBUSY, operation="expose")
        _keep_default_signals()
        ready = threading.Event()
        ops = self._ops = _Operations(self._files, ready)
        fuse_cls = _make_fuse_class()
        session = self._fast = fastpath.Session.create()

        def serve() -> None:
            try:
                with fastpath.serving(session):
                    fuse_cls(ops, self.mount_dir, foreground=True, direct_io=True, fsname="dmtools", subtype="dmtools",
                             attr_timeout=0, entry_timeout=0, negative_timeout=0, max_threads=FUSE_THREADS,
                             max_idle_threads=FUSE_THREADS)
            except BaseException as err:  # noqa: BLE001 - reported to the thread that waits
                self._error = err
            finally:
                if session is not None:
                    session.close()
                ops.pipes.close()
                ready.set()

        self._error = None
        self._thread = threading.Thread(target=serve, name="dmtools-fuse", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not mounted_at(self.mount_dir):
            if self._error is not None or not self._thread.is_alive():
                raise DMError(f"FUSE mount at {self.mount_dir} failed: {self._error}", operation="expose")
            if time.monotonic() > deadline:
                raise DMError(f"FUSE mount at {self.mount_dir} did not come up", operation="expose")
            ready.wait(0.01)

    def close(self) -> None:
        """Detach every loop device and unmount the file system.

        A loop device that an outside user still holds open keeps its FUSE file busy: the file
        system is then detached lazily (gone once they close it) and the FUSE thread, which serves
        their failing I/O until then, is not waited for long.
        """
        with self._lock:
            devs = list(self._files.values())
        for dev in devs:
            if dev.exposure is not None:
                self.remove(dev, timeout=0.0)
        thread = self._thread
        if thread is None:
            return
        busy = False
        if mounted_at(self.mount_dir):
            busy = _umount(self.mount_dir) != 0
            if busy:
                _umount(self.mount_dir, MNT_DETACH)
        thread.join(FUSE_JOIN_BUSY if busy else 10)
        self._thread = None
        if os.path.basename(self.run_dir) == f"engine-{os.getpid()}":
            for sub in ("mapper", "fuse", ""):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(self.run_dir, sub) if sub else self.run_dir)

    # --- devices ----------------------------------------------------------------------------
    def add(self, dev: "Device") -> tuple[int, int]:
        """Expose ``dev``; returns the loop device's ``(major, minor)``."""
        with self._lock:
            self._ensure_mounted()
            self._serial += 1
            fname = f"dev{self._serial}"
            self._files[fname] = dev
            slot = self._fast.slot() if self._fast is not None else None
            if slot is not None:
                self._ops.handles[fname] = slot.handle
        path = os.path.join(self.mount_dir, fname)
        self._ops.attaching.add(fname)
        try:
            lo = self._attach(path)
        except BaseException:
            self._forget(fname, slot)
            raise
        finally:
            self._ops.attaching.discard(fname)
        if not dev.size:
            self._refresh(fname, lo)
        link = os.path.join(self.mapper_dir, dev.name)
        try:
            rundir.replace_symlink(lo.path, link)
        except OSError as err:
            with contextlib.suppress(DMError):
                loop.detach(lo)
            self._forget(fname, slot)
            raise DMError(f"cannot create {link}: {err}", errno=err.errno, operation="expose", device=dev.name) from err
        dev.exposure = Exposed(fname, lo, link)
        dev.fast_path = slot
        udev_settle()
        return lo.major, lo.minor

    @staticmethod
    def _attach(path: str) -> loop.LoopDevice:
        try:
            return loop.attach(path, direct_io=True)
        except (LoopError, DMError) as err:
            log.debug("direct I/O loop on %s refused (%s); using buffered", path, err)
        return loop.attach(path)

    def remove(self, dev: "Device", *, timeout: float = 5.0) -> None:
        """Withdraw ``dev``'s loop device, link and file.

        Waits up to ``timeout`` seconds for outside openers of the loop device to close it; one
        still holding it open keeps it until its last close (autoclear), with every I/O failing.
        The device must hold no I/O by then (``Engine._drop`` kills it first): the kernel may
        read the loop device while detaching it.
        """
        exp: Exposed | None = dev.exposure
        if exp is None:
            return
        with contextlib.suppress(OSError):
            if os.readlink(exp.link) == exp.loop.path:
                os.unlink(exp.link)
        with contextlib.suppress(DMError):
            loop.detach(exp.loop, timeout=timeout)
        slot, dev.fast_path = dev.fast_path, None
        idle = self._forget(exp.file, slot)
        dev.exposure = None
        if idle:
            self._ops.pipes.sweep()

    def _forget(self, fname: str, slot: fastpath.Slot | None) -> bool:
        """Drop file ``fname`` and its C slot; True when no file is left."""
        if slot is not None:
            slot.close(timeout=FAST_SLOT_WAIT)
        with self._lock:
            self._files.pop(fname, None)
            self._ops.handles.pop(fname, None)
            return not self._files

    def fast_stats(self, name: str) -> dict[str, int]:
        """What the C data path did for device ``name`` (``dmtools._ffi.fastio.STATS``: requests
        and bytes moved in C, requests it handed to Python); empty when it does not serve it."""
        with self._lock:
            devs = [d for d in self._files.values() if d.name == name]
        slot: fastpath.Slot | None = devs[0].fast_path if devs else None
        return slot.stats() if slot is not None else {}

    def renamed(self, dev: "Device") -> None:
        """Move the mapper link to the device's new name."""
        exp: Exposed | None = dev.exposure
        if exp is None:
            return
        new_link = os.path.join(self.mapper_dir, dev.name)
        rundir.replace_symlink(exp.loop.path, new_link)
        with contextlib.suppress(OSError):
            os.unlink(exp.link)
        exp.link = new_link

    def resized(self, dev: "Device") -> None:
        """After a table swap: new size to the loop device, read-only flag as the table's.

        The loop device is opened only for what changed (its size and flag are read from sysfs),
        and only while the device serves I/O: opening a block device waits for its disk's
        ``open_mutex``, which ``sync(2)`` (``sync_bdevs``) and the device's last close hold while
        they wait for its dirty pages to be written. An open made while those writes cannot
        complete (the device suspended, or a write held until a reload) would wait forever.
        """
        exp: Exposed | None = dev.exposure
        if exp is None:
            return
        now = _loop_size_and_ro(exp.loop)
        if now == (dev.size, dev.read_only):
            return
        if now is None or now[0] != dev.size:
            try:
                self._refresh(exp.file, exp.loop)
            except DMError:
                if dev.exposure is exp and not dev.removed:
                    raise
                return  # removed meanwhile (``Engine.resume`` calls this without the device's lock)
        if now is None or now[1] != dev.read_only:
            with contextlib.suppress(OSError):
                fd = os.open(exp.loop.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.ioctl(fd, BLKROSET, struct.pack("i", 1 if dev.read_only else 0))
                finally:
                    os.close(fd)
        udev_settle()

    def _refresh(self, fname: str, lo: loop.LoopDevice) -> None:
        with contextlib.suppress(OSError):
            os.stat(os.path.join(self.mount_dir, fname))  # refresh the FUSE inode size
        loop.set_capacity(lo)

    def abort(self) -> bool:
        """Abort this exposure's FUSE connection (``abort_fuse``): a last resort for a hung exit."""
        return abort_fuse(self.mount_dir)

    def link_path(self, dev: "Device") -> str:
        """``<run_dir>/mapper/NAME``."""
        exp: Exposed | None = dev.exposure
        return exp.link if exp is not None else ""

    def device_for_path(self, path: str) -> "Device | None":
        """The device whose FUSE file ``path`` is (never opened through FUSE)."""
        real = os.path.realpath(path)
        mount = os.path.realpath(self.mount_dir) + "/"
        if real.startswith(mount):
            with self._lock:
                return self._files.get(real[len(mount):])
        return None

    # --- open counts ------------------------------------------------------------------------
    def open_count(self, dev: "Device") -> int:
        """Opens of the loop device outside the engine, as the kernel's dm would count them
        (:mod:`dmtools.engine.openers`: open files, holder disks, a mount, swap, loops over it),
        found without opening it, so that a suspended device's count never waits for its writes."""
        exp: Exposed | None = dev.exposure
        if exp is None:
            return 0
        count = openers.count(exp.loop.path, exp.loop.major, exp.loop.minor)
        # A table of this engine over the device holds it O_EXCL (dmtools.claims): that open is
        # the table, which the device's own count already has.
        if self.engine.claims.holds(("blk", (exp.loop.major, exp.loop.minor))):
            count -= 1
        return max(0, count)
