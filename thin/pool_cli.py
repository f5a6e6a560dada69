"""``dmtools thin ...`` commands that drive pools and volumes through device-mapper.

    dmtools thin pool create NAME --metadata DEV --data DEV [--chunk-size 64K] [--zero|--no-zero]
                                  [--error-if-no-space]
    dmtools thin pool extend NAME          take up grown metadata/data devices
    dmtools thin pool status NAME          (also: thin status POOL)
    dmtools thin create POOL NAME --size 1G
    dmtools thin snapshot POOL ORIGIN NAME
    dmtools thin remove POOL NAME
    dmtools thin list [POOL]               (--json)
    dmtools thin status POOL [NAME]        (--json)
    dmtools thin activate --metadata DEV --data DEV [--no-volumes]
    dmtools thin deactivate POOL

The devices are LVM's: NAME-tmeta, NAME-tdata, NAME-tpool (thin-pool) and NAME (linear over the
pool); volumes are ``thin NAME-tpool <id>``. A bare ``--chunk-size`` or ``--size`` number is in
sectors, as in tables; units (``64K``, ``1G``) are bytes.
"""

from __future__ import annotations

import argparse
from typing import Any

from dmtools.cli import common
from dmtools.cli.common import actions, emit, verb
from dmtools.units import SECTOR, format_size, parse_sectors

__all__ = ["add_commands"]


def _manager(args: argparse.Namespace) -> Any:
    from thin.manager import ThinPoolManager

    return ThinPoolManager(common.open_backend(args))  # looked up at call time (tests replace it)


def _pool_text(info: Any) -> str:
    s = info.status
    if s.fail:
        state = "FAILED"
    else:
        state = (s.mode.value if s.mode else "?") + (" needs_check" if s.needs_check else "")
    data = "" if s.data_percent is None else f"data {s.used_data}/{s.total_data} blocks ({s.data_percent:.2f}%)"
    meta = "" if s.metadata_percent is None else (
        f"metadata {s.used_metadata}/{s.total_metadata} blocks ({s.metadata_percent:.2f}%)")
    return (f"pool {info.name}: {format_size(info.data_sectors * SECTOR)}, chunk "
            f"{format_size(info.block_size * SECTOR)}, {info.volumes} volumes, transaction {info.transaction_id}, "
            f"{state}; {data}; {meta}; status {s.format().strip()!r}")


def _volume_line(v: Any) -> str:
    mapped = "-" if v.status is None or v.status.mapped_sectors is None else format_size(v.status.mapped_sectors * SECTOR)
    return (f"{v.name:<20} {v.pool:<16} {v.dev_id:>8} {format_size(v.size * SECTOR):>10} {mapped:>10} "
            f"{'active' if v.active else 'inactive':<9} {v.origin or ''}")


_HEADER = f"{'NAME':<20} {'POOL':<16} {'ID':>8} {'SIZE':>10} {'MAPPED':>10} {'STATE':<9} ORIGIN"


def cmd_pool_create(args: argparse.Namespace) -> int:
    info = _manager(args).create_pool(
        args.name, args.metadata, args.data, chunk_size=parse_sectors(args.chunk_size),
        zero=args.zero, error_if_no_space=args.error_if_no_space)
    return emit(args, info.to_dict(), lambda: "created " + _pool_text(info))


def cmd_pool_extend(args: argparse.Namespace) -> int:
    info = _manager(args).extend(args.name)
    return emit(args, info.to_dict(), lambda: "extended " + _pool_text(info))


def cmd_pool_status(args: argparse.Namespace) -> int:
    info = _manager(args).pool_status(args.name)
    return emit(args, info.to_dict(), lambda: _pool_text(info))


def cmd_create(args: argparse.Namespace) -> int:
    v = _manager(args).create(args.pool, args.name, parse_sectors(args.size))
    return emit(args, v.to_dict(), f"created thin volume {v.name} (id {v.dev_id}, {format_size(v.size * SECTOR)}) "
                                    f"in pool {v.pool}")


def cmd_snapshot(args: argparse.Namespace) -> int:
    v = _manager(args).snapshot(args.pool, args.origin, args.name)
    return emit(args, v.to_dict(), f"created thin snapshot {v.name} (id {v.dev_id}) of {v.origin} in pool {v.pool}")


def cmd_remove(args: argparse.Namespace) -> int:
    _manager(args).remove(args.pool, args.name)
    return emit(args, {"removed": args.name, "pool": args.pool}, f"removed thin volume {args.name} from pool {args.pool}")


def cmd_list(args: argparse.Namespace) -> int:
    volumes = _manager(args).list(args.pool)
    return emit(args, [v.to_dict() for v in volumes], lambda: "\n".join([_HEADER, *map(_volume_line, volumes)]))


def cmd_status(args: argparse.Namespace) -> int:
    if args.name is None:
        return cmd_pool_status(argparse.Namespace(**{**vars(args), "name": args.pool}))
    v = _manager(args).status(args.pool, args.name)
    return emit(args, v.to_dict(), lambda: "\n".join([_HEADER, _volume_line(v)]))


def cmd_activate(args: argparse.Namespace) -> int:
    info = _manager(args).activate(args.metadata, args.data, volumes=not args.no_volumes)
    return emit(args, info.to_dict(), lambda: "activated " + _pool_text(info))


def cmd_deactivate(args: argparse.Namespace) -> int:
    _manager(args).deactivate(args.pool)
    return emit(args, {"deactivated": args.pool}, f"deactivated pool {args.pool} and its volumes")


def add_commands(subparsers: Any) -> None:
    """Add the pool and volume commands to the ``dmtools thin`` sub-parser collection."""
    _, psub = actions(subparsers, "pool", "thin pools: create, extend, status")
    c = verb(psub, "create", cmd_pool_create, "make a pool on a metadata and a data device (LVM's layout)", "NAME")
    c.add_argument("--metadata", required=True, metavar="DEV", help="metadata device (its start is wiped)")
    c.add_argument("--data", required=True, metavar="DEV", help="data device")
    c.add_argument("--chunk-size", default="64K", metavar="SIZE",
                   help="data block size: sectors, or with a unit (default 64K, LVM's; 64K..1G, "
                   "a multiple of 64K)")
    zero = c.add_mutually_exclusive_group()
    zero.add_argument("--zero", dest="zero", action="store_true", default=True,
                      help="zero new blocks before first use (default)")
    zero.add_argument("--no-zero", dest="zero", action="store_false", help="skip_block_zeroing")
    c.add_argument("--error-if-no-space", action="store_true",
                   help="fail writes at once when the data space is full (default: queue them)")
    verb(psub, "extend", cmd_pool_extend, "take up grown metadata and data devices", "NAME")
    verb(psub, "status", cmd_pool_status, "a pool's usage, mode and transaction id", "NAME")

    v = verb(subparsers, "create", cmd_create, "make a thin volume in a pool", "POOL", "NAME")
    v.add_argument("--size", required=True, metavar="SIZE", help="virtual size: sectors, or with a unit")
    verb(subparsers, "snapshot", cmd_snapshot, "snapshot a thin volume (no copy; blocks are shared)",
         "POOL", "ORIGIN", "NAME")
    verb(subparsers, "remove", cmd_remove, "deactivate a thin volume and delete it from its pool", "POOL", "NAME")
    verb(subparsers, "list", cmd_list, "thin volumes of one or every active pool (--json)", "POOL?")
    verb(subparsers, "status", cmd_status, "a pool's status, or one volume's (--json)", "POOL", "NAME?")
    a = verb(subparsers, "activate", cmd_activate, "activate a pool and its volumes again (after a restart)")
    a.add_argument("--metadata", required=True, metavar="DEV")
    a.add_argument("--data", required=True, metavar="DEV")
    a.add_argument("--no-volumes", action="store_true", help="activate the pool only")
    verb(subparsers, "deactivate", cmd_deactivate, "remove a pool's devices and its volumes (data kept)", "POOL")
