"""What a local server's export is: the file or device behind nbdkit's ``file`` plugin.

An export of a server on this host may be the very bytes of a file or device that a copy also
names by path (``dmtools serve`` of a device over ``/srv/a.img``, then a copy between ``/srv/a.img``
and the export). The server's side of a connection to this host is known: sock_diag's
``UNIX_DIAG_PEER`` gives the inode of the server's end of a Unix-socket connection (for TCP, the
socket of ``/proc/net/tcp`` with our addresses swapped), and the process holding it is found among
the process that listened (``SO_PEERCRED``, socket(7)) and its children (``dmtools serve`` listens,
then starts nbdkit with the socket), else among the processes named nbdkit (one that forked into
the background after it listened). When that process is nbdkit serving the ``file`` plugin's one
``file=PATH`` through filters that keep every byte where it is, the export is ``PATH`` byte for
byte (``nbdkit-file-plugin(1)``: ``file=`` serves one file whatever export name is asked).
Anything else (another server or plugin, ``dir=``, a filter that moves, hides or diverts bytes, a
relative path, a process we may not read) is unknown: ``None``.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

__all__ = ["served_file"]

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
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2


def served_file(fd: int) -> str | None:
    """The path of what the nbdkit ``file`` plugin at the other end of socket ``fd`` (a Unix
    socket, or TCP to a server of this host) serves (absolute, maybe ``/proc/PID/fd/N``), or
    ``None`` when that is not known for sure."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    listener = 0
    try:
        if sock.family == socket.AF_UNIX:
            listener = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            peer = _peer_inode(os.fstat(fd).st_ino)
        elif sock.family in (socket.AF_INET, socket.AF_INET6):
            peer = _tcp_peer_inode(sock.family, sock.getsockname(), sock.getpeername())
        else:
            return None
    except OSError:
        return None
    finally:
        sock.close()
    if peer is None:
        return None
    # The process holding the server's end of this connection: the listener or a child of it
    # (dmtools serve, nbdkit -f), else any nbdkit (one that forked into the background after
    # it listened, so its listener's PID is its parent's; over TCP the listener is not told).
    want = f"socket:[{peer}]"
    near = [listener, *_children(listener)] if listener > 0 else []
    for pid in near + [p for p in _nbdkit_pids() if p not in near]:
        if _holds(pid, want):
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


def _peer_inode(ino: int) -> int | None:
    """The inode of the other end of our Unix socket ``ino`` (sock_diag, ``UNIX_DIAG_PEER``)."""
    req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, _UDIAG_SHOW_PEER,
                      0xFFFFFFFF, 0xFFFFFFFF)
    msg = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + req
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5)
        nl.sendto(msg, (0, 0))
        data = nl.recv(65536)
    if len(data) < 32:
        return None
    length, kind = struct.unpack_from("=IH", data)
    if kind != _SOCK_DIAG_BY_FAMILY:  # NLMSG_ERROR: no such socket, or no unix_diag module
        return None
    pos = 32  # nlmsghdr (16) + unix_diag_msg (16)
    while pos + 4 <= min(length, len(data)):
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            break
        if atype == _UNIX_DIAG_PEER and alen >= 8:
            return int(struct.unpack_from("=I", data, pos + 4)[0])
        pos += (alen + 3) & ~3
    return None


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


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


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
