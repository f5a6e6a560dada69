"""``dmtools thin ...``: thin pools and the offline metadata tools.

    dmtools thin check META                 check a pool's metadata (as thin_check)
    dmtools thin dump META [-m] [--json]    the metadata as thin_dump's XML, or JSON
    dmtools thin restore -i XML -o META     write metadata from that XML (as thin_restore)
    dmtools thin ls META [-o FIELDS]        devices with mapped, exclusive and shared blocks (as thin_ls)
    dmtools thin export --metadata DEV --data DEV --id N OUT [--force]
                                            one thin volume's bytes, without device-mapper

The pool commands (``thin pool create`` ...) come from ``thin.pool_cli`` when it is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from typing import Any

from dmtools.cli.common import actions, emit, progress_options, verb
from dmtools.errors import InvalidArgument

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "thin pools; offline check/dump/restore/ls/export of their metadata"

__all__ = ["register"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``thin`` and its sub-commands to an argparse sub-parser collection."""
    p, sub = actions(subparsers, "thin", SUMMARY, __doc__)
    _add_offline_commands(sub)
    try:  # the pool commands live in their own module, thin/pool_cli.py, with one entry point
        pool_cli = importlib.import_module("thin.pool_cli")
    except ModuleNotFoundError as err:
        if err.name != "thin.pool_cli":
            raise
    else:
        pool_cli.add_commands(sub)
    return p  # type: ignore[no-any-return]


def _dev_id(text: str) -> int:
    from thin.metadata.ondisk import MAX_DEV_ID

    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid device id {text!r}") from None
    if not 0 <= value <= MAX_DEV_ID:
        raise argparse.ArgumentTypeError(f"device id {value} is out of range (0..{MAX_DEV_ID})")
    return value


def cmd_check(args: argparse.Namespace) -> int:
    from thin.metadata.check import check

    report = check(args.metadata, skip_mappings=args.skip_mappings)
    if args.clear_needs_check_flag and report.ok and report.needs_check:
        from thin.metadata.pool import ThinMetadata

        with ThinMetadata.open(args.metadata, writable=True) as md:
            md.clear_needs_check()
            md.commit()
        report.needs_check = False
    json_out = getattr(args, "json", False)
    if json_out:
        emit(args, report.to_dict(), "")
    # The errors go to stderr in either mode (stdout holds the report): a failed check always
    # ends with a 'dmtools: ...' line there, as every other failed command does.
    for line in report.leaks + report.warnings:
        print(f"dmtools: {args.metadata}: warning: {line}", file=sys.stderr)
    for line in report.errors:
        print(f"dmtools: {args.metadata}: {line}", file=sys.stderr)
    if not json_out and not args.quiet:
        state = "ok" if report.ok else f"{len(report.errors)} errors"
        print(f"{args.metadata}: {state}: transaction {report.transaction_id}, {report.devices} devices, "
              f"{report.mappings} mappings; metadata {report.metadata_blocks - report.metadata_free}/"
              f"{report.metadata_blocks} blocks used, data {report.data_blocks - report.data_free}/"
              f"{report.data_blocks}{'; needs_check is set' if report.needs_check else ''}")
    return 0 if report.ok else 1


def _snapshot_arg(args: argparse.Namespace) -> bool | int:
    if args.snap_block is not None:
        return int(args.snap_block)
    return bool(args.metadata_snap)


def cmd_dump(args: argparse.Namespace) -> int:
    from thin.metadata.dump import dump_json, dump_xml
    from thin.metadata.pool import ThinMetadata

    ids = set(args.dev_id) if args.dev_id else None
    as_json = getattr(args, "json", False)
    if args.output:
        _check_output(args.metadata, args.output, "dump")
    with ThinMetadata.open(args.metadata, snapshot=_snapshot_arg(args)) as md:
        # JSON is made whole before the output is opened; XML is written as it is made
        text = json.dumps(dump_json(md, dev_ids=ids, skip_mappings=args.skip_mappings), indent=2) if as_json else ""
        with _claimed(args.output), open(args.output, "w") if args.output else contextlib.nullcontext(sys.stdout) as out:
            if as_json:
                out.write(text + "\n")
            else:
                dump_xml(md, out, dev_ids=ids, skip_mappings=args.skip_mappings)
    return 0


def _check_output(source: str, output: str, operation: str) -> None:
    """Refuse an output that shares bytes with ``source`` under any spelling (``DeviceConflict``)
    or that a live table maps (``DeviceBusy``): opening it for writing truncates it."""
    from dmtools.inputs import check_devices, live_backends

    backends = live_backends()
    try:
        check_devices({"the metadata": source, "--output": output}, backends=backends, operation=operation,
                      in_use=["--output"], missing_ok=["--output"])
    finally:
        for b in backends:
            b.close()


def _claimed(path: str | None) -> contextlib.AbstractContextManager[object]:
    """A claim of an existing ``path`` while it is written (``DeviceBusy`` when mounted or held)."""
    if not path or not os.path.exists(path):
        return contextlib.nullcontext()
    from dmtools import claims

    return claims.claim(path)


def cmd_restore(args: argparse.Namespace) -> int:
    from dmtools.identity import ensure_disjoint

    from thin.metadata.restore import restore

    if not os.path.exists(args.output):
        raise InvalidArgument(f"{args.output} does not exist: create the metadata file or device first "
                              "(its size is the metadata size)")
    ensure_disjoint({"--input": args.input, "--output": args.output})
    image = restore(args.input, args.output)
    return emit(args, {"devices": len(image.devices), "mappings": sum(len(d.vblocks) for d in image.devices),
                       "transaction": image.transaction},
                "" if args.quiet else f"restored {len(image.devices)} devices, transaction {image.transaction}, "
                f"to {args.output}")


def cmd_ls(args: argparse.Namespace) -> int:
    from thin.offline import format_ls, ls

    rows = ls(args.metadata, snapshot=args.metadata_snap)
    fields = [f for f in args.format.split(",") if f] if args.format else None
    text = format_ls(rows, fields, headers=not args.no_headers) if fields else \
        format_ls(rows, headers=not args.no_headers)
    return emit(args, [r.to_dict() for r in rows], text.rstrip("\n"))


def cmd_export(args: argparse.Namespace) -> int:
    from dmtools.inputs import live_backends
    from dmtools.units import format_size, parse_size
    from kcopyd.progress import reporter_for, reporting

    from thin.offline import export

    size = None if args.size is None else parse_size(args.size, default_unit="s")
    backends = live_backends()  # an output in use by a live table is refused
    try:
        with reporting(reporter_for(args.progress, quiet=args.quiet, label="export")) as progress:
            result = export(args.metadata, args.data, args.id, args.out, size=size, snapshot=args.metadata_snap,
                            progress=progress, force=args.force, backends=backends)
    finally:
        for b in backends:
            b.close()
    return emit(args, {"bytes": result.bytes, "mapped_blocks": result.mapped_blocks, "runs": result.runs,
                       "output": result.output},
                f"exported thin device {args.id}: {format_size(result.bytes)}, {result.mapped_blocks} mapped blocks "
                f"in {result.runs} runs, to {args.out} ({result.output})")


def _add_offline_commands(sub: Any) -> None:
    """The commands that read or write metadata without device-mapper."""
    c = verb(sub, "check", cmd_check, "check pool metadata (as thin_check; exit 1 on errors)")
    c.add_argument("metadata", metavar="META", help="metadata device or file")
    c.add_argument("--skip-mappings", action="store_true", help="do not walk the mapping trees")
    c.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    c.add_argument("--clear-needs-check-flag", action="store_true",
                   help="clear the superblock's needs_check flag when the metadata is clean (as LVM runs thin_check)")

    d = verb(sub, "dump", cmd_dump, "metadata as thin_dump's XML (or JSON with --json)")
    d.add_argument("metadata", metavar="META")
    d.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    d.add_argument("--dev-id", type=_dev_id, action="append", metavar="N", help="only this device (repeatable)")
    d.add_argument("--skip-mappings", action="store_true", help="devices only")
    d.add_argument("-m", "--metadata-snap", action="store_true",
                   help="read the held metadata snapshot the superblock names (as thin_dump -m)")
    d.add_argument("--snap-block", type=int, metavar="BLOCK", help="read a metadata snapshot at BLOCK")

    r = verb(sub, "restore", cmd_restore, "write metadata from thin_dump XML (as thin_restore)")
    r.add_argument("-i", "--input", required=True, metavar="XML")
    r.add_argument("-o", "--output", required=True, metavar="META",
                   help="existing metadata file or device (overwritten)")
    r.add_argument("-q", "--quiet", action="store_true")

    s = verb(sub, "ls", cmd_ls, "thin devices with mapped, exclusive and shared blocks (as thin_ls)")
    s.add_argument("metadata", metavar="META")
    s.add_argument("-o", "--format", metavar="FIELDS", help="comma-separated thin_ls fields")
    s.add_argument("--no-headers", action="store_true")
    s.add_argument("-m", "--metadata-snap", action="store_true", help="read the held metadata snapshot")

    e = verb(sub, "export", cmd_export, "write one thin volume from a pool's metadata and data devices")
    e.add_argument("--metadata", required=True, metavar="DEV")
    e.add_argument("--data", required=True, metavar="DEV")
    e.add_argument("--id", required=True, type=_dev_id, metavar="N", help="thin device id")
    e.add_argument("--size", metavar="SIZE", help="volume size (default: the block device's, or up to the "
                   "highest mapped block); sectors, or with a unit")
    e.add_argument("-m", "--metadata-snap", action="store_true", help="read through the held metadata snapshot")
    e.add_argument("--force", action="store_true", help="overwrite an existing non-empty output: a file starts "
                   "over at the volume's size, a block device's first bytes are written")
    progress_options(e)
    e.add_argument("out", metavar="OUT", help="output file (created) or block device")
