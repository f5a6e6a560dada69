"""``dmtools loop attach|detach|list``: loop devices without losetup.

There is no ``--autoclear``: the kernel detaches an autoclear device when its last opener closes
it, and the attaching command is that opener, so the device would be gone before the path is
printed. Autoclear is for programs that keep the device open (``dmtools.loop.attach``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from dmtools.cli import common as cli_common
from dmtools.units import parse_size

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "attach, detach and list loop devices"

if TYPE_CHECKING:  # pragma: no cover - imported by the commands that use it (start-up)
    from dmtools import loop

__all__ = ["register", "cmd_attach", "cmd_detach", "cmd_list"]


def register(subparsers: Any) -> None:
    """Add the ``loop`` command and its actions to an argparse sub-parser collection."""
    _, actions = cli_common.actions(subparsers, "loop", SUMMARY)

    p = cli_common.verb(actions, "attach", cmd_attach, "bind a free loop device to FILE and print its path")
    p.add_argument("file", metavar="FILE", help="backing file or block device")
    p.add_argument("--read-only", "-r", action="store_true", help="attach read-only")
    p.add_argument("--direct-io", action="store_true", help="bypass the page cache of FILE")
    p.add_argument("--partscan", "-P", action="store_true", help="scan for partitions")
    p.add_argument("--offset", "-o", metavar="SIZE", default="0",
                   help="start this far into FILE (bytes unless a unit is given: 1M, 2048s)")
    p.add_argument("--sizelimit", metavar="SIZE", default="0", help="use at most this much of FILE (0: up to its end)")
    p.add_argument("--sector-size", metavar="SIZE", default="0",
                   help="logical block size of the loop device (512 to 4096)")
    p = cli_common.verb(actions, "detach", cmd_detach, "detach loop devices")
    p.add_argument("devices", metavar="DEV", nargs="+", help="/dev/loopN (or loopN)")
    cli_common.json_option(cli_common.verb(actions, "list", cmd_list, "list attached loop devices with their "
                                           "backing files"))


def cmd_attach(args: argparse.Namespace) -> int:
    """Attach ``args.file``; prints the loop device's path."""
    from dmtools import loop

    dev = loop.attach(args.file, read_only=args.read_only, direct_io=args.direct_io, partscan=args.partscan,
                      offset=parse_size(args.offset, "b"), sizelimit=parse_size(args.sizelimit, "b"),
                      block_size=parse_size(args.sector_size, "b"))
    print(dev.path)
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    """Detach every device named; the first failure raises (devices before it are detached)."""
    from dmtools import loop

    for name in args.devices:
        loop.detach(name)
    return 0


def format_table(devices: list[loop.LoopDevice]) -> str:
    """The listing as aligned columns, losetup style."""
    rows = [[d.path, str(d.sizelimit), str(d.offset), *("1" if f else "0" for f in (d.autoclear, d.read_only, d.direct_io)),
             d.backing_file or ""] for d in devices]
    return cli_common.columns([["NAME", "SIZELIMIT", "OFFSET", "AUTOCLEAR", "RO", "DIO", "BACK-FILE"], *rows])


def cmd_list(args: argparse.Namespace) -> int:
    """Print the attached loop devices (a table, or JSON with ``--json``)."""
    from dmtools import loop

    devices = loop.list_loops()
    return cli_common.emit(args, [d.to_dict() for d in devices], lambda: format_table(devices) if devices else "")
