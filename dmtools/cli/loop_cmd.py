"""``dmtools loop attach|detach|list``: loop devices without losetup.

There is no ``--autoclear``: the kernel detaches an autoclear device when its last opener closes
it, and the attaching command is that opener, so the device would be gone before the path is
printed. Autoclear is for programs that keep the device open (``dmtools.loop.attach``).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from dmtools.units import parse_size

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "attach, detach and list loop devices"

if TYPE_CHECKING:  # pragma: no cover - imported by the commands that use it (start-up)
    from dmtools import loop

__all__ = ["register", "cmd_attach", "cmd_detach", "cmd_list"]


def register(subparsers: Any) -> None:
    """Add the ``loop`` command and its actions to an argparse sub-parser collection."""
    parser = subparsers.add_parser("loop", help=SUMMARY)
    actions = parser.add_subparsers(dest="loop_action", metavar="ACTION")
    actions.required = True

    p = actions.add_parser("attach", help="bind a free loop device to FILE and print its path")
    p.add_argument("file", metavar="FILE", help="backing file or block device")
    p.add_argument("--read-only", "-r", action="store_true", help="attach read-only")
    p.add_argument("--direct-io", action="store_true", help="bypass the page cache of FILE")
    p.add_argument("--partscan", "-P", action="store_true", help="scan for partitions")
    p.add_argument(
        "--offset",
        "-o",
        metavar="SIZE",
        default="0",
        help="start this far into FILE (bytes unless a unit is given: 1M, 2048s)",
    )
    p.add_argument(
        "--sizelimit", metavar="SIZE", default="0", help="use at most this much of FILE (0: up to its end)"
    )
    p.add_argument(
        "--sector-size",
        metavar="SIZE",
        default="0",
        help="logical block size of the loop device (512 to 4096)",
    )
    p.set_defaults(func=cmd_attach)

    p = actions.add_parser("detach", help="detach loop devices")
    p.add_argument("devices", metavar="DEV", nargs="+", help="/dev/loopN (or loopN)")
    p.set_defaults(func=cmd_detach)

    p = actions.add_parser("list", help="list attached loop devices with their backing files")
    # SUPPRESS keeps the root parser's --json when this one is not given.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")
    p.set_defaults(func=cmd_list)


def cmd_attach(args: argparse.Namespace) -> int:
    """Attach ``args.file``; prints the loop device's path."""
    from dmtools import loop

    dev = loop.attach(
        args.file,
        read_only=args.read_only,
        direct_io=args.direct_io,
        partscan=args.partscan,
        offset=parse_size(args.offset, "b"),
        sizelimit=parse_size(args.sizelimit, "b"),
        block_size=parse_size(args.sector_size, "b"),
    )
    print(dev.path)
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    """Detach every device named; the first failure raises (devices before it are detached)."""
    from dmtools import loop

    for name in args.devices:
        loop.detach(name)
    return 0


def _row(dev: loop.LoopDevice) -> list[str]:
    return [
        dev.path,
        str(dev.sizelimit),
        str(dev.offset),
        "1" if dev.autoclear else "0",
        "1" if dev.read_only else "0",
        "1" if dev.direct_io else "0",
        dev.backing_file or "",
    ]


def format_table(devices: list[loop.LoopDevice]) -> str:
    """The listing as aligned columns, losetup style."""
    header = ["NAME", "SIZELIMIT", "OFFSET", "AUTOCLEAR", "RO", "DIO", "BACK-FILE"]
    rows = [header] + [_row(d) for d in devices]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join(
        " ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + " " + r[-1] for r in rows
    )


def cmd_list(args: argparse.Namespace) -> int:
    """Print the attached loop devices (a table, or JSON with ``--json``)."""
    from dmtools import loop

    devices = loop.list_loops()
    if getattr(args, "json", False):
        print(json.dumps([d.to_dict() for d in devices], indent=2, sort_keys=True))
    elif devices:
        print(format_table(devices))
    return 0
