"""The run directory (socket, pid file, log, exposures) and the files in it, made safely.

The daemon runs as root and writes in its run directory, which ``DMTOOLS_RUN_DIR`` may point
anywhere. Like ssh's ``StrictModes``, the directory must belong to the calling user and be
writable by nobody else, and so must every directory above it (root's may be shared when sticky,
as ``/tmp``): otherwise another user could plant or swap entries. Inside it nothing is opened
through a symlink: a file is opened with ``O_NOFOLLOW`` and checked to be a regular file of ours
with one link, and a wrong entry (a symlink, a hard link, a device node, another owner's file) is
replaced by a new file made under a temporary name with ``O_EXCL`` and renamed over it. Links and
sockets are made the same way, under a temporary name, then renamed in place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from dmtools.errors import DaemonError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)

if TYPE_CHECKING:  # pragma: no cover
    import socket
    from collections.abc import Iterator

#: Where root's daemon lives by default; created 0700 (only root goes in).
ROOT_RUN_DIR = "/run/dmtools"


def run_dir() -> str:
    """Where the daemon keeps its socket, pid file and exposures for the calling user.

    ``DMTOOLS_RUN_DIR`` overrides it (separate engines side by side); else ``/run/dmtools`` for root,
    ``$XDG_RUNTIME_DIR/dmtools`` or ``/tmp/dmtools-UID`` for other users. Whoever writes there
    checks it first (the checks below).
    """
    override = os.environ.get("DMTOOLS_RUN_DIR")
    if override:
        return os.path.abspath(override)
    if os.geteuid() == 0:
        return ROOT_RUN_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "dmtools") if runtime else f"/tmp/dmtools-{os.geteuid()}"


def socket_path(directory: str | None = None) -> str:
    """The control socket."""
    return os.path.join(directory or run_dir(), "control.sock")


def pid_path(directory: str) -> str:
    """The daemon's pid file, locked while it runs."""
    return os.path.join(directory, "daemon.pid")


#: ``sun_path``'s size in ``struct sockaddr_un``: a socket's path and its terminating NUL.
SUN_PATH_SIZE = 108
#: Where a process names its own descriptors: ``/proc/self/fd/N`` is the directory itself.
PROC_FD = "/proc/self/fd"


@contextlib.contextmanager
def socket_name(path: str) -> Iterator[str]:
    """A name of socket ``path`` that fits ``sun_path``: ``path`` itself when it is short enough,
    else ``/proc/self/fd/N/NAME`` with ``N`` its directory opened ``O_PATH | O_NOFOLLOW`` (the
    kernel resolves that to the directory opened, whatever is renamed meanwhile), valid inside
    the block. Raises ``DaemonError`` (ENAMETOOLONG) when ``path`` is too long and ``/proc`` is
    not there to name the directory, ENOENT when the directory is missing, EPERM when it is a
    symlink or changed while it was opened."""
    if len(os.fsencode(path)) < SUN_PATH_SIZE:
        yield path
        return
    directory, name = os.path.split(os.path.abspath(path))
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DaemonError(f"run directory {directory} does not exist", errno=errno.ENOENT) from None
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse(directory, "it is a symlink or not a directory") from None
        raise
    try:
        st = os.fstat(fd)
        try:
            named = os.lstat(directory)
        except FileNotFoundError:
            named = None
        if named is None or (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
            raise _refuse(directory, "it was replaced while it was opened")
        short = f"{PROC_FD}/{fd}"
        try:
            seen = os.stat(short)
        except OSError:
            seen = None
        if seen is None or (seen.st_dev, seen.st_ino) != (st.st_dev, st.st_ino):
            raise DaemonError(f"run directory {directory} is too long for a Unix socket (a socket's "
                              f"path holds at most {SUN_PATH_SIZE - 1} bytes: sun_path) and {PROC_FD} "
                              "is missing to name it by a shorter path: set DMTOOLS_RUN_DIR to a "
                              "shorter directory", errno=errno.ENAMETOOLONG)
        yield f"{short}/{name}"
    finally:
        os.close(fd)


def connect(sock: socket.socket, path: str) -> None:
    """``sock.connect(path)`` for a socket in a run directory, whatever the length of ``path``
    (:func:`socket_name`). ``OSError`` as ``connect`` raises it."""
    with socket_name(path) as name:
        sock.connect(name)


def _refuse(path: str, why: str) -> DaemonError:
    return DaemonError(f"unsafe run directory {path}: {why}", errno=errno.EPERM)


def _check_owned(path: str, st: os.stat_result, *, shared_ok: bool) -> None:
    uid = os.geteuid()
    if st.st_uid != uid and not (shared_ok and st.st_uid == 0):
        raise _refuse(path, f"owned by uid {st.st_uid}, not by uid {uid}")
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (shared_ok and st.st_uid == 0 and st.st_mode & stat.S_ISVTX):
        raise _refuse(path, f"writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} "
                            f"(mode {stat.S_IMODE(st.st_mode):04o})")


def check(path: str) -> str:
    """Refuse (``DaemonError``, EPERM) a run directory that is not safe to write in; return it.

    It must be a directory, not a symlink, owned by the effective uid and not group- or
    world-writable; each directory above it must be owned by that uid or root and not writable by
    others unless root's and sticky. Raises ``DaemonError`` with ENOENT when it does not exist.
    """
    path = os.path.abspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise DaemonError(f"run directory {path} does not exist", errno=errno.ENOENT) from None
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "it is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "not a directory")
    _check_owned(path, st, shared_ok=False)
    parent = os.path.realpath(os.path.dirname(path))
    above = parent
    while True:
        _check_owned(above, os.stat(above), shared_ok=True)
        if above == "/":
            break
        above = os.path.dirname(above)
    return path


def ensure(path: str, mode: int = 0o700) -> str:
    """Create the run directory if missing (``mode``, 0700 by default; parents 0755), then
    :func:`check` it. Returns the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)  # never follows a symlink at ``path``; one there is refused below
    return check(path)


def subdir(path: str, mode: int) -> str:
    """A directory inside a checked run directory (``mount``/``mapper``): made with ``mode`` if
    missing; refused when it is a symlink, another user's, or writable by others."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "not a directory" + (" (a symlink)" if stat.S_ISLNK(st.st_mode) else ""))
    _check_owned(path, st, shared_ok=False)
    return path


def _temp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{os.getpid()}.tmp")


def _fresh_file(path: str, mode: int) -> None:
    """Put a new empty file at ``path`` (temporary name, ``O_EXCL``, then ``rename``)."""
    tmp = _temp_name(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    os.close(fd)
    os.rename(tmp, path)


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """Open ``path`` in a run directory without following a symlink; returns the descriptor.

    ``flags`` are ``os.open``'s access flags (``O_RDWR``, ``O_WRONLY | O_APPEND`` …). A missing or
    wrong entry (symlink, hard link, not a regular file, not ours) is replaced by a new empty
    file; the file's permissions are set to ``mode`` (a log is 0600, not world-readable).
    """
    for _ in range(8):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            _fresh_file(path, mode)
            continue
        if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid()):
            if stat.S_ISDIR(st.st_mode):
                raise _refuse(path, "a directory stands where a file belongs")
            _fresh_file(path, mode)  # rename replaces the entry itself, never what it points at
            continue
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, OSError) as err:
            if isinstance(err, FileNotFoundError) or err.errno == errno.ELOOP:
                continue  # swapped since lstat: look again
            raise
        now = os.fstat(fd)
        if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev) or now.st_nlink != 1:
            os.close(fd)
            continue
        os.set_blocking(fd, True)
        if stat.S_IMODE(now.st_mode) != mode:
            os.fchmod(fd, mode)
        return fd
    raise _refuse(path, "its entries keep changing")


def bind_socket(path: str, backlog: int = 64) -> socket.socket:
    """A listening Unix socket at ``path`` (mode 0600), bound under a temporary name and renamed
    over whatever stood there (a stale socket or a planted symlink is replaced, not followed)."""
    import socket  # the daemon's only: a client finding the socket path need not load it

    with socket_name(_temp_name(path)) as tmp:  # a path too long for sun_path: by /proc/self/fd
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            server.bind(tmp)
        except OSError:
            server.close()
            raise
        finally:
            os.umask(old)
        try:
            os.rename(tmp, os.path.join(os.path.dirname(tmp), os.path.basename(path)))
        except OSError:
            server.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    server.listen(backlog)
    return server


def check_socket(path: str) -> None:
    """Refuse to connect through anything but a socket of ours (never through a symlink).

    Raises ``DaemonError`` with ECONNREFUSED, as for a socket nobody serves: a daemon started
    there replaces the entry (:func:`bind_socket`). ``FileNotFoundError`` passes through.
    """
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else (
            "not a socket" if not stat.S_ISSOCK(st.st_mode) else f"owned by uid {st.st_uid}")
        raise DaemonError(f"no dmtools daemon serves {path}: it is {what}", errno=errno.ECONNREFUSED)


def replace_symlink(target: str, link: str) -> None:
    """Make ``link`` point at ``target``, atomically: a new link under a temporary name renamed
    over the old entry (which is never followed)."""
    tmp = _temp_name(link)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    try:
        os.rename(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
