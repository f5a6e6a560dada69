"""What a local server's export is: the file or device behind nbdkit's ``file`` plugin.

An export of a server on this host may be the very bytes of a file or device that a copy or a
table also names by path (``dmtools serve`` of a device over ``/srv/a.img``, then a copy between
``/srv/a.img`` and the export). The server of a Unix socket is found without connecting: the
listening socket bound to the socket file's inode (sock_diag ``UNIX_DIAG_VFS``); the server of a
TCP connection to this host by its end of the connection (``/proc/net/tcp`` with our addresses
swapped). The process holding that socket is looked for among the processes named nbdkit
(``dmtools serve`` runs one; one that forked into the background counts as well). When it serves
the ``file`` plugin's one ``file=PATH`` through filters that keep every byte where it is, the
export is ``PATH`` byte for byte (``nbdkit-file-plugin(1)``: ``file=`` serves one file whatever
export name is asked). Anything else (another server or plugin, ``dir=``, a filter that moves,
hides or diverts bytes, a relative path, a process we may not read) is unknown: ``None``.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

__all__ = ["served_file", "socket_served_file"]

#: nbdkit options that take their argument as the next word (nbdkit(1) SYNOPSIS).
_WITH_ARGUMENT = frozenset({
    "-D", "--debug", "-e", "--exportname", "--export-name", "--export", "--filter", "-g", "--group",
    "-i", "--ipaddr", "--log", "--mask-handshake", "-P", "--pidfile", "-p", "--port", "--run",
    "--selinux-label", "-t", "--threads", "--tls", "--tls-certificates", "--tls-psk", "-U", "--unix",
    "-u", "--user",
})
#: Filters that leave every byte at its offset and send writes to the plugin (their man pages):
#: they time, log, fail or limit requests, or change what is advertised.
_IN_PLACE_FILTERS = frozenset({
    "blocksize", "blocksize-policy", "cacheextents", "delay", "error", "exitlast", "exitwhen", "fua",
    "ip", "limit", "log", "multi-conn", "nocache", "noextents", "noparallel", "nozero", "pause",
    "rate", "readahead", "retry", "retry-request", "stats",
})
_SHORT_WITH_ARGUMENT = tuple(o for o in _WITH_ARGUMENT if len(o) == 2)
# sock_diag (linux/sock_diag.h, linux/unix_diag.h, linux/netlink.h)
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_TCP_LISTEN = 10
_UDIAG_SHOW_VFS = 0x2
_UNIX_DIAG_VFS = 1


def served_file(fd: int) -> str | None:
    """What the nbdkit ``file`` plugin at the other end of TCP socket ``fd`` serves, when that
    server is on this host (its end of the connection: the socket of ``/proc/net/tcp{,6}`` with
    our addresses swapped), or ``None``."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return None
            peer = _tcp_peer_inode(sock.family, sock.getsockname(), sock.getpeername())
    except OSError:
        return None
    return _holder_file(f"socket:[{peer}]") if peer is not None else None


def socket_served_file(path: str) -> str | None:
    """What the nbdkit ``file`` plugin listening on Unix socket ``path`` serves, found without
    connecting (a connection may end a server that serves one client, as qemu-nbd without
    ``--persistent``): the listening socket bound to that inode (sock_diag ``UNIX_DIAG_VFS``)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    # unix_diag reports the inode's super block s_dev in the kernel's own encoding (MKDEV)
    want = (st.st_ino, (os.major(st.st_dev) << 20) | os.minor(st.st_dev))
    try:
        listening = [ino for ino, vfs in _listening_unix_sockets() if vfs == want]
    except OSError:
        return None
    return _holder_file(f"socket:[{listening[0]}]") if len(listening) == 1 else None


def _holder_file(target: str) -> str | None:
    """:func:`_nbdkit_file` of the nbdkit process that holds ``target`` (``socket:[INODE]``)."""
    for pid in _nbdkit_pids():
        if _holds(pid, target):
            return _nbdkit_file(pid)
    return None


def _tcp_peer_inode(family: int, ours: tuple[Any, ...], theirs: tuple[Any, ...]) -> int | None:
    """The inode of the server's end of our TCP connection when the server is on this host: the
    socket of ``/proc/net/tcp{,6}`` whose local address is our peer and whose remote one is us."""
    def hexaddr(addr: tuple[Any, ...]) -> str:
        raw = socket.inet_pton(family, addr[0])
        words = struct.unpack(f"={len(raw) // 4}I", raw)  # the kernel prints each 32-bit word native
        return "".join(f"{w:08X}" for w in words) + f":{addr[1]:04X}"

    local, remote = hexaddr(theirs), hexaddr(ours)
    try:
        with open("/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp") as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) > 9 and cols[1] == local and cols[2] == remote:
                    return int(cols[9])
    except (OSError, ValueError):
        return None
    return None


def _listening_unix_sockets() -> list[tuple[int, tuple[int, int]]]:
    """``(socket inode, (file inode, kernel dev))`` of every listening Unix socket bound to a
    path (a sock_diag dump, ``UDIAG_SHOW_VFS``)."""
    req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0, _UDIAG_SHOW_VFS, 0, 0)
    msg = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + req
    out: list[tuple[int, tuple[int, int]]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5)
        nl.sendto(msg, (0, 0))
        while True:
            data = nl.recv(1 << 16)
            pos = 0
            while pos + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, pos)
                if length < 16 or kind in (_NLMSG_DONE, _NLMSG_ERROR):
                    return out
                ino = struct.unpack_from("=I", data, pos + 20)[0]  # unix_diag_msg.udiag_ino
                apos, end = pos + 32, pos + length
                while apos + 4 <= end:
                    alen, atype = struct.unpack_from("=HH", data, apos)
                    if alen < 4:
                        break
                    if atype == _UNIX_DIAG_VFS and alen >= 12:
                        vfs_ino, vfs_dev = struct.unpack_from("=II", data, apos + 4)
                        out.append((ino, (vfs_ino, vfs_dev)))
                    apos += (alen + 3) & ~3
                pos += (length + 3) & ~3
            if not data:
                return out


def _holds(pid: int, target: str) -> bool:
    """True when process ``pid`` has a descriptor on ``target`` (``socket:[INODE]``)."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"{base}/{name}") == target:
                return True
        except OSError:
            continue
    return False


def _nbdkit_pids() -> list[int]:
    """Every process named nbdkit (``/proc/PID/comm``)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:  # os.open/os.read: a third of open()'s cost, for every process of the host
                fd = os.open(f"/proc/{name}/comm", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if os.read(fd, 64) == b"nbdkit\n":
                    out.append(int(name))
            except OSError:
                pass
            finally:
                os.close(fd)
    return out


def _nbdkit_file(pid: int) -> str | None:
    """``PATH`` when process ``pid`` is ``nbdkit [in-place filters] file [file=]PATH``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="surrogateescape") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return None
    if not argv or os.path.basename(argv[0]) != "nbdkit":
        return None
    return parse_nbdkit_argv(argv[1:])


def parse_nbdkit_argv(args: list[str]) -> str | None:
    """``PATH`` when nbdkit's arguments (after ``nbdkit``) serve ``file [file=]PATH`` through
    in-place filters only; ``None`` for anything else."""
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name == "--filter":
            if not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            if value not in _IN_PLACE_FILTERS:
                return None
        elif not eq and arg in _WITH_ARGUMENT:
            i += 1  # its argument is the next word
        elif not arg.startswith("--") and arg.startswith(_SHORT_WITH_ARGUMENT) and len(arg) > 2:
            pass  # -Upath: the argument is attached
        i += 1
    if i < len(args) and args[i] == "--":
        i += 1
    if i >= len(args) or args[i] not in ("file", "nbdkit-file-plugin.so") \
            and not args[i].endswith("/nbdkit-file-plugin.so"):
        return None
    path = None
    for param in args[i + 1:]:
        key, eq, value = param.partition("=")
        if not eq or "/" in key:  # the magic key: a bare word is file=WORD
            key, value = "file", param
        if key == "dir":
            return None
        if key == "file":
            if path is not None:
                return None
            path = value
    return path if path is not None and path.startswith("/") else None
