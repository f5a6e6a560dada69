"""``dmtools snapshot ...``: create, list, merge and remove snapshots; inspect and export COWs.

    dmtools snapshot create ORIGIN --cow DEV --name NAME [--chunk-size 4K] [--transient]
    dmtools snapshot list | status NAME | remove NAME
    dmtools snapshot merge NAME [--no-wait] [--progress[=FD]]
    dmtools snapshot activate ORIGIN --cow DEV --name NAME
    dmtools snapshot inspect COW                       (no device-mapper needed)
    dmtools snapshot export --origin DEV --cow DEV OUT [--force]  (no device-mapper needed)

After ``Merge failed`` (a read or write error while merging), ``snapshot merge NAME`` again retries:
the closed origin is reactivated and merges the chunks left on the COW.
A bare ``--chunk-size`` number is in sectors, as in tables; units (``16K``) are bytes.
"""

from __future__ import annotations

import argparse
from typing import Any

from dmtools.cli import common
from dmtools.cli.common import (actions, STATUS_EVENTS, device_argument, emit, progress_options, seconds,
                                state_dir_option, verb)
from dmtools.units import SECTOR, format_size, parse_sectors

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "snapshots: create, list, merge, remove; inspect/export COWs"

__all__ = ["register"]


def _manager(args: argparse.Namespace) -> Any:
    from snapshot.manager import SnapshotManager

    return SnapshotManager(common.open_backend(args))  # looked up at call time (tests replace it)


def _reporter(args: argparse.Namespace, label: str) -> Any:
    from kcopyd.progress import reporter_for

    return reporter_for(args.progress, quiet=args.quiet, label=label)


def _info_line(info: Any) -> str:
    pct = "" if info.percent is None else f"{info.percent:6.2f}%"
    return f"{info.name:<20} {info.origin:<20} {info.state:<12} {info.status.format():<24} {pct}"


def cmd_create(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    from dmtools.target_values import StoreMode

    store = StoreMode.TRANSIENT if args.transient else StoreMode.PERSISTENT
    info = mgr.create(args.origin, args.cow, args.name, chunk_size=parse_sectors(args.chunk_size), store=store)
    return emit(args, info.to_dict(), f"created snapshot {info.name} of {info.origin} ({info.status.format()})")


def cmd_activate(args: argparse.Namespace) -> int:
    info = _manager(args).activate(args.origin, args.cow, args.name)
    return emit(args, info.to_dict(), f"activated snapshot {info.name} of {info.origin} ({info.status.format()})")


def cmd_list(args: argparse.Namespace) -> int:
    infos = _manager(args).list()
    header = f"{'NAME':<20} {'ORIGIN':<20} {'STATE':<12} {'STATUS':<24} USED"
    return emit(args, [i.to_dict() for i in infos], lambda: "\n".join([header] + [_info_line(i) for i in infos]))


def cmd_status(args: argparse.Namespace) -> int:
    from dmtools.cli.monitor_cmd import format_event
    from dmtools.events import last_events

    mgr = _manager(args)
    info = mgr.status(args.name)
    events = last_events(args.name, mgr.dm.backend, STATUS_EVENTS, root=args.state_dir)
    lines = [f"{k}: {v}" for k, v in info.to_dict().items()]
    lines += ["recent events:"] + [f"  {format_event(e)}" for e in events] if events else []
    return emit(args, {**info.to_dict(), "events": [e.to_dict() for e in events]}, "\n".join(lines))


def cmd_merge(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    if args.no_wait:
        mgr.merge(args.name, wait=False)
        return emit(args, {"name": args.name, "merging": True}, f"merging {args.name} in the background")
    from kcopyd.progress import reporting

    with reporting(_reporter(args, f"merge {args.name}"), SECTOR) as progress:
        mgr.merge(args.name, progress=progress, timeout=args.timeout)
    return emit(args, {"name": args.name, "merged": True}, f"merged {args.name}")


def cmd_refresh(args: argparse.Namespace) -> int:
    info = _manager(args).refresh(args.name)
    return emit(args, info.to_dict(), f"refreshed snapshot {info.name} ({info.status.format()})")


def cmd_remove(args: argparse.Namespace) -> int:
    _manager(args).remove(args.name)
    return emit(args, {"name": args.name, "removed": True}, f"removed snapshot {args.name}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from snapshot.offline import inspect

    info = inspect(args.cow)
    return emit(args, info.to_dict(), info.format)


def cmd_export(args: argparse.Namespace) -> int:
    from kcopyd.progress import reporting

    from snapshot.offline import export

    from dmtools.inputs import live_backends

    backends = live_backends()  # an output in use by a live table is refused
    try:
        with reporting(_reporter(args, "export")) as progress:
            result = export(args.origin, args.cow, args.out, progress=progress, force=args.force, backends=backends)
    finally:
        for b in backends:
            b.close()
    return emit(
               args,
               {"bytes": result.bytes, "exceptions": result.exceptions, "runs": result.runs, "output": result.output},
               f"exported {format_size(result.bytes)} ({result.exceptions} exceptions from the COW) to {args.out} "
               f"({result.output})",
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``snapshot`` and its sub-commands to an argparse sub-parser collection."""
    p, sub = actions(subparsers, "snapshot", SUMMARY, __doc__)

    c = verb(sub, "create", cmd_create, "snapshot ORIGIN into a COW device")
    c.add_argument("origin", metavar="ORIGIN", help="device-mapper device to snapshot")
    c.add_argument("--cow", required=True, metavar="DEV", type=device_argument, help="COW device or file (its header is wiped)")
    c.add_argument("--name", required=True, help="name of the snapshot device")
    c.add_argument("--chunk-size", default="4K", metavar="SIZE",
                   help="chunk size: sectors, or with a unit (default 4K, LVM's)")
    c.add_argument("--transient", action="store_true", help="non-persistent store (N): lost on deactivation")
    a = verb(sub, "activate", cmd_activate, "activate an existing persistent COW of ORIGIN", "ORIGIN")
    a.add_argument("--cow", required=True, metavar="DEV", type=device_argument)
    a.add_argument("--name", required=True)
    verb(sub, "list", cmd_list, "list snapshots (--json for JSON)")
    state_dir_option(verb(sub, "status", cmd_status, "one snapshot's usage and state", "NAME"))
    m = verb(sub, "merge", cmd_merge, "roll the origin back to the snapshot (again: retry a failed merge)", "NAME")
    m.add_argument("--no-wait", action="store_true", help="start the merge and return")
    m.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS")
    progress_options(m)
    verb(sub, "refresh", cmd_refresh, "reload a snapshot through exception handover, taking up a grown COW "
         "(as 'lvchange --refresh')", "NAME")
    verb(sub, "remove", cmd_remove, "drop a snapshot (the plain origin returns with the last one)", "NAME")
    verb(sub, "inspect", cmd_inspect, "read a COW's header and metadata (offline)", "COW")
    e = verb(sub, "export", cmd_export, "write a snapshot's view from its origin and COW (offline)")
    e.add_argument("--origin", required=True, metavar="DEV")
    e.add_argument("--cow", required=True, metavar="DEV")
    e.add_argument("out", metavar="OUT", help="output file (created) or block device")
    e.add_argument("--force", action="store_true",
                   help="overwrite an existing non-empty output: a file starts over at the origin's size, "
                   "a block device's first bytes are written")
    progress_options(e)
    return p  # type: ignore[no-any-return]
