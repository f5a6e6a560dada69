"""``dmtools nbd attach|detach|list``: NBD exports as kernel block devices (nbd.ko, netlink).

``attach URI`` prints the device's path (``/dev/nbdN``); kernel device-mapper tables can then
name it like any disk. ``list`` shows what is attached, with the URI each device serves.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "attach NBD exports as /dev/nbdN (kernel nbd.ko)"

__all__ = ["register", "cmd_attach", "cmd_detach", "cmd_list"]


def register(subparsers: Any) -> None:
    """Add the ``nbd`` command and its actions to an argparse sub-parser collection."""
    parser = subparsers.add_parser("nbd", help=SUMMARY)
    actions = parser.add_subparsers(dest="nbd_action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("attach", help="connect an export to a kernel nbd device and print its path")
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
    p.set_defaults(func=cmd_attach)

    p = actions.add_parser("detach", help="disconnect nbd devices")
    p.add_argument("devices", metavar="DEV", nargs="+", help="/dev/nbdN (or nbdN)")
    p.set_defaults(func=cmd_detach)

    p = actions.add_parser("list", help="list nbd devices with an export attached")
    p.add_argument("--all", "-a", action="store_true", help="every nbd device, attached or not")
    # SUPPRESS keeps the root parser's --json when this one is not given.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")
    p.set_defaults(func=cmd_list)


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
    if getattr(args, "json", False):
        print(json.dumps([d.to_dict() for d in devices], indent=2, sort_keys=True))
        return 0
    if not devices:
        return 0
    rows = [["NAME", "CONNECTED", "SIZE", "RO", "BACKEND"]]
    rows += [[d.path, "1" if d.connected else "0", format_size(d.size) if d.connected else "-",
              "1" if d.read_only else "0", d.backend] for d in devices]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print(" ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + " " + r[4])
    return 0
