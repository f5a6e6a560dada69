"""``dmtools nbd attach|detach|list``: NBD exports as kernel block devices (nbd.ko, netlink).

``attach URI`` prints the device's path (``/dev/nbdN``); kernel device-mapper tables can then
name it like any disk. ``list`` shows what is attached, with the URI each device serves.
"""

from __future__ import annotations

import argparse
from typing import Any

from dmtools.cli import common as cli_common

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "attach NBD exports as /dev/nbdN (kernel nbd.ko)"

__all__ = ["register", "cmd_attach", "cmd_detach", "cmd_list"]


def register(subparsers: Any) -> None:
    """Add the ``nbd`` command and its actions to an argparse sub-parser collection."""
    _, actions = cli_common.actions(subparsers, "nbd", SUMMARY)

    p = cli_common.verb(actions, "attach", cmd_attach, "connect an export to a kernel nbd device and print its path")
    p.add_argument("uri", metavar="URI", help="nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
    p.add_argument("--device", metavar="DEV", help="the nbd device to use (/dev/nbdN); default: a free one")
    p.add_argument("--read-only", "-r", action="store_true", help="attach read-only")
    p.add_argument("--connections", "-C", type=int, default=1, metavar="N",
                   help="connections (more than 1 needs a server that allows multi-conn)")
    p.add_argument("--timeout", "-t", type=int, default=30, metavar="SECONDS",
                   help="a request without a reply for this long marks its connection dead (default 30; "
                        "0 waits forever)")
    p.add_argument("--dead-conn-timeout", type=int, default=0, metavar="SECONDS",
                   help="how long I/O waits for a dead connection to be replaced before failing (default 0)")
    p = cli_common.verb(actions, "detach", cmd_detach, "disconnect nbd devices")
    p.add_argument("devices", metavar="DEV", nargs="+", help="/dev/nbdN (or nbdN)")
    p = cli_common.verb(actions, "list", cmd_list, "list nbd devices with an export attached")
    p.add_argument("--all", "-a", action="store_true", help="every nbd device, attached or not")
    cli_common.json_option(p)


def cmd_attach(args: argparse.Namespace) -> int:
    """Attach ``args.uri``; prints the device's path."""
    from dmtools.nbd import kernel

    dev = kernel.attach(args.uri, device=args.device, connections=args.connections, read_only=args.read_only,
                        timeout=args.timeout, dead_conn_timeout=args.dead_conn_timeout)
    print(dev.path)
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    """Detach every device named; the first failure raises (devices before it are detached)."""
    from dmtools.nbd import kernel

    for name in args.devices:
        kernel.detach(name)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print the nbd devices (a table, or JSON with ``--json``)."""
    from dmtools.nbd import kernel
    from dmtools.units import format_size

    devices = kernel.list_devices(all_devices=args.all)
    rows = [[d.path, "1" if d.connected else "0", format_size(d.size) if d.connected else "-",
             "1" if d.read_only else "0", d.backend] for d in devices]
    return cli_common.emit(args, [d.to_dict() for d in devices],
                           lambda: cli_common.columns([["NAME", "CONNECTED", "SIZE", "RO", "BACKEND"], *rows]) if rows else "")
