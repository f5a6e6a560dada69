"""Attach NBD exports to the kernel's nbd.ko as ``/dev/nbdN``, detach them, list them.

As nbd-client does in netlink mode: the handshake runs here (:mod:`dmtools.nbd.handshake`), then
``NBD_CMD_CONNECT`` hands the connected sockets to the kernel with the export's size and
transmission flags (drivers/block/nbd.c ``nbd_genl_connect``); the kernel keeps its own reference
to each socket, so no process has to stay behind. The URI is recorded as the device's backend
identifier (``/sys/block/nbdN/backend``), which is how ``list`` names what is attached.

Timeouts (drivers/block/nbd.c): ``timeout`` seconds without a reply marks a connection dead;
without a live connection, I/O waits ``dead_conn_timeout`` seconds for a reconfiguration, then
fails with EIO. A timeout of 0 leaves I/O waiting forever on a hung server, which is why the
default here is 30 s (the block layer's own default request timeout).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any

from dmtools.errors import DeviceBusy, DeviceNotFound, DMError, InvalidArgument, KernelUnavailable
from dmtools.identity import normalize_nbd_uri
from dmtools.nbd import netlink as nl
from dmtools.nbd.handshake import FLAG_READ_ONLY, ExportInfo, connect_socket, negotiate
from dmtools.nbd.uri import parse_uri

__all__ = ["NbdDevice", "attach", "detach", "list_devices", "device_index", "NBD_MAJOR"]

#: The block major of nbd devices (include/uapi/linux/major.h NBD_MAJOR).
NBD_MAJOR = 43
#: Seconds ``detach`` waits for the kernel to release the device.
DETACH_WAIT = 10.0
_NAME_RE = re.compile(r"^nbd(\d+)$")


@dataclass(frozen=True)
class NbdDevice:
    """A kernel nbd device: ``index`` (``/dev/nbdN``), connected or not, and what it serves."""

    index: int
    connected: bool
    size: int = 0
    read_only: bool = False
    backend: str = ""

    @property
    def path(self) -> str:
        """``/dev/nbdN``."""
        return f"/dev/nbd{self.index}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (``path`` included)."""
        return {"path": self.path, **asdict(self)}


def device_index(dev: str | os.PathLike[str] | int) -> int:
    """The N of ``/dev/nbdN``, ``nbdN`` or an int; ``InvalidArgument`` for anything else."""
    if isinstance(dev, bool):
        raise InvalidArgument(f"not an nbd device: {dev!r}", operation="nbd")
    if isinstance(dev, int):
        if dev < 0:
            raise InvalidArgument(f"not an nbd device number: {dev}", operation="nbd")
        return dev
    text = os.fspath(dev)
    if "\0" in text:
        raise InvalidArgument(f"not an nbd device: {text!r}", operation="nbd")
    m = _NAME_RE.match(os.path.basename(text))
    if m and (os.sep not in text or not os.path.exists(text)):
        return int(m.group(1))
    try:
        st = os.stat(text)
    except OSError as err:
        raise InvalidArgument(f"cannot open: {err.strerror}", errno=err.errno, operation="nbd", device=text) from err
    if not stat.S_ISBLK(st.st_mode) or os.major(st.st_rdev) != NBD_MAJOR:
        raise InvalidArgument("not an nbd device", errno=errno.ENOTTY, operation="nbd", device=text)
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"))
    m = _NAME_RE.match(name)
    if not m:  # a partition of an nbd device
        raise InvalidArgument("not a whole nbd device", operation="nbd", device=text)
    return int(m.group(1))


def _open_netlink() -> nl.NbdNetlink:
    """The "nbd" family; loads nbd.ko once if it is missing (as libdevmapper loads dm-mod)."""
    try:
        return nl.NbdNetlink()
    except nl.FamilyMissing:
        pass
    except OSError as err:
        raise KernelUnavailable(f"netlink: {err.strerror}", errno=err.errno, operation="nbd") from err
    try:
        subprocess.run(["modprobe", "nbd"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return nl.NbdNetlink()
    except OSError as err:
        raise KernelUnavailable("the kernel's nbd module is not available (modprobe nbd)", errno=errno.ENODEV,
                                operation="nbd") from err


def _kernel_error(err: OSError, what: str, device: str | None) -> DMError:
    code = err.errno or errno.EIO
    if code == errno.EPERM:
        return DMError(f"{what}: needs CAP_SYS_ADMIN (run as root)", errno=code, operation="nbd", device=device)
    if code == errno.EBUSY:
        return DeviceBusy(f"{what}: the device is in use", errno=code, operation="nbd", device=device)
    if code == errno.ENOENT or code == errno.ENODEV:
        return DeviceNotFound(f"{what}: no such nbd device", errno=code, operation="nbd", device=device)
    return DMError(f"{what}: {os.strerror(code)}", errno=code, operation="nbd", device=device)


def _sysfs(index: int, attr: str) -> str:
    try:
        with open(f"/sys/block/nbd{index}/{attr}") as f:
            return f.read().strip()
    except OSError:
        return ""


def _status(sock: nl.NbdNetlink, index: int | None = None) -> list[tuple[int, bool]]:
    attrs: list[nl.Attr] = [] if index is None else [(nl.ATTR_INDEX, nl.u32(index))]
    out = []
    for reply in sock.nbd(nl.CMD_STATUS, attrs):
        for kind, payload in reply:
            if kind != nl.ATTR_DEVICE_LIST:
                continue
            for item_kind, item in nl.parse_attrs(payload):
                if item_kind != nl.DEVICE_ITEM:
                    continue
                fields = dict(nl.parse_attrs(item))
                idx = struct.unpack_from("=I", fields.get(nl.DEVICE_INDEX, b"\0\0\0\0"))[0]
                connected = bool(fields.get(nl.DEVICE_CONNECTED, b"\0")[0])
                out.append((int(idx), connected))
    return sorted(out)


def _describe(index: int, connected: bool) -> NbdDevice:
    size = int(_sysfs(index, "size") or 0) * 512 if connected else 0
    return NbdDevice(index, connected, size, _sysfs(index, "ro") == "1" if connected else False,
                     _sysfs(index, "backend") if connected else "")


def list_devices(*, all_devices: bool = False) -> list[NbdDevice]:
    """The nbd devices with an export attached (every nbd device with ``all_devices``).

    Without nbd.ko loaded there are none (the module is not loaded just to list nothing).
    """
    try:
        sock = nl.NbdNetlink()
    except nl.FamilyMissing:
        return []
    except OSError as err:
        raise KernelUnavailable(f"netlink: {err.strerror}", errno=err.errno, operation="nbd") from err
    with sock:
        try:
            found = _status(sock)
        except OSError as err:
            raise _kernel_error(err, "status", None) from err
    return [_describe(i, c) for i, c in found if c or all_devices]


def attach(uri: str, *, device: str | os.PathLike[str] | int | None = None, connections: int = 1,
           read_only: bool = False, timeout: int = 30, dead_conn_timeout: int = 0) -> NbdDevice:
    """Connect the export ``uri`` to nbd.ko; return the device (``/dev/nbdN``).

    ``device`` picks the nbd device (else the kernel takes a free one). ``connections`` > 1 needs
    a server that allows multi-conn. All or nothing: on any error the sockets are closed and no
    device is attached. Raises ``InvalidArgument`` (bad URI or options), ``NbdConnectionError``
    (server unreachable, export refused, TLS asked), ``DeviceBusy`` (the device is attached
    already), ``KernelUnavailable`` (no nbd.ko) and ``DMError`` (not root).
    """
    parsed = parse_uri(uri)
    backend = normalize_nbd_uri(uri)  # the export's identity (dmtools.identity)
    for name, value, low in (("connections", connections, 1), ("timeout", timeout, 0),
                             ("dead_conn_timeout", dead_conn_timeout, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidArgument(f"{name} must be an integer >= {low}, not {value!r}", operation="nbd")
    index = device_index(device) if device is not None else None
    sockets = []
    try:
        info: ExportInfo | None = None
        for _ in range(connections):
            s = connect_socket(parsed)
            sockets.append(s)
            got = negotiate(s, parsed.export, uri)
            s.settimeout(None)  # the kernel takes a blocking socket
            if info is None:
                info = got
                if connections > 1 and not got.multi_conn:
                    raise InvalidArgument(f"{connections} connections: the server does not allow multi-conn",
                                          operation="nbd", device=uri)
            elif (got.size, got.flags) != (info.size, info.flags):
                raise InvalidArgument("the server's connections disagree on the export", operation="nbd", device=uri)
        assert info is not None
        # Block size: the server's minimum, at least 512 and at most a page (nbd_set_size).
        block = max(512, info.min_block)
        if block > os.sysconf("SC_PAGE_SIZE") or block & (block - 1):
            raise InvalidArgument(f"the server's minimum block size {info.min_block} is beyond what the kernel "
                                  f"takes (512 to {os.sysconf('SC_PAGE_SIZE')})", operation="nbd", device=uri)
        flags = info.flags | (FLAG_READ_ONLY if read_only else 0)
        attrs: list[nl.Attr] = [
            (nl.ATTR_SIZE_BYTES, nl.u64(info.size)),
            (nl.ATTR_BLOCK_SIZE_BYTES, nl.u64(block)),
            (nl.ATTR_SERVER_FLAGS, nl.u64(flags)),
            (nl.ATTR_TIMEOUT, nl.u64(timeout)),
            (nl.ATTR_DEAD_CONN_TIMEOUT, nl.u64(dead_conn_timeout)),
            (nl.ATTR_SOCKETS, [(nl.SOCK_ITEM, [(nl.SOCK_FD, nl.u32(s.fileno()))]) for s in sockets]),
            (nl.ATTR_BACKEND_IDENTIFIER, backend.encode() + b"\0"),
        ]
        if index is not None:
            attrs.insert(0, (nl.ATTR_INDEX, nl.u32(index)))
        with _open_netlink() as sock:
            try:
                replies = sock.nbd(nl.CMD_CONNECT, attrs)
            except OSError as err:
                raise _kernel_error(err, "attach", f"/dev/nbd{index}" if index is not None else uri) from err
        for reply in replies:
            for kind, payload in reply:
                if kind == nl.ATTR_INDEX:
                    index = struct.unpack_from("=I", payload)[0]
        if index is None:
            raise DMError("the kernel did not say which device it attached", operation="nbd", device=uri)
    finally:
        for s in sockets:  # the kernel holds its own references once connected
            s.close()
    return NbdDevice(index, True, info.size, bool(flags & FLAG_READ_ONLY), backend)


def detach(device: str | os.PathLike[str] | int) -> None:
    """Disconnect ``device`` (``/dev/nbdN``) and wait until the kernel has released it.

    Raises ``InvalidArgument`` for a device that is not an nbd device or has nothing attached.
    """
    index = device_index(device)
    where = f"/dev/nbd{index}"
    with _open_netlink() as sock:
        try:
            state = dict(_status(sock, index))
        except OSError as err:
            raise _kernel_error(err, "status", where) from err
        if not state.get(index):
            raise InvalidArgument("nothing is attached", operation="nbd", device=where)
        try:
            sock.nbd(nl.CMD_DISCONNECT, [(nl.ATTR_INDEX, nl.u32(index))])
        except OSError as err:
            raise _kernel_error(err, "detach", where) from err
        deadline = time.monotonic() + DETACH_WAIT
        while dict(_status(sock, index)).get(index):
            if time.monotonic() > deadline:
                raise DeviceBusy(f"still connected {DETACH_WAIT:.0f} s after the disconnect", operation="nbd",
                                 device=where)
            time.sleep(0.05)
