"""``dmtools mirror``: create, watch, resync, repair, split and inspect mirrors.

Examples::

    dmtools mirror create vol /dev/loop1 /dev/loop2 --log /dev/loop3 --region-size 512K
    dmtools mirror status vol --json
    dmtools mirror resync vol --rate 100M --progress
    dmtools mirror repair vol 1 /dev/loop4
    dmtools mirror monitor vol --spare /dev/loop5
    dmtools mirror resync-offline /dev/loop1 /dev/loop2 --log /dev/loop3 --activate vol
    dmtools mirror inspect /dev/loop3

Sizes take units (512K, 2M); a bare region size is in sectors. ``--progress`` draws a bar with an
ETA; ``--progress=FD`` writes ``N/100`` lines to descriptor FD.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from dmtools.cli import common
from dmtools.cli.common import (actions, STATUS_EVENTS, device_argument, emit, json_option, log_argument,
                                progress_options, seconds, state_dir_option, verb)
from dmtools.errors import InvalidArgument
from dmtools.units import parse_sectors, parse_size

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "mirrors: dirty-region logs, resync, repair"

__all__ = ["register"]


def _rate(text: str | None) -> int | None:
    """``--rate`` in bytes per second; not given: no limit (an empty value is refused, not taken as none)."""
    return parse_size(text, "b") if text is not None else None


def _leg(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _manager(args: argparse.Namespace) -> Any:
    from mirror.manager import MirrorManager

    return MirrorManager(common.open_backend(args))  # looked up at call time (tests replace it)


class _Progress:
    """A progress callback drawing through ``kcopyd.progress`` with the ETA of the copy itself."""

    def __init__(self, args: argparse.Namespace, label: str) -> None:
        from kcopyd.progress import reporter_for

        self.reporter = reporter_for(args.progress, quiet=args.quiet, label=label)
        self.base: int | None = None
        self.last = (0, 0)

    def __call__(self, done: int, total: int) -> None:
        if self.base is None:
            # what was already in sync does not count towards the rate and ETA (unless it is all)
            self.base = done if done < total else 0
        self.last = (done - self.base, total - self.base)
        self.reporter.update(*self.last)

    def finish(self, ok: bool) -> None:
        self.reporter.finish(*self.last, ok=ok)


def _failed(args: argparse.Namespace, err: Any) -> int:
    """A resync/repair/rebuild whose copies failed: the one-line error on stderr, and with ``--json``
    the failed regions and legs on stdout; exit status 1."""
    import sys

    from dmtools.cli.common import one_line

    emit(args, err.to_dict(), "")
    print(f"dmtools: {one_line(err)}", file=sys.stderr)
    return 1


def _copy_and_show(args: argparse.Namespace, label: str, action: Callable[[_Progress], Any]) -> int:
    """Run a copying manager call ``action(progress)`` under a progress display and print the state it
    returns; a copy that failed (``RecoveryFailed``) is the one-line error and exit status 1."""
    from mirror.resync import RecoveryFailed

    prog = _Progress(args, label)
    ok = False
    try:
        st = action(prog)
        ok = True
    except RecoveryFailed as err:
        return _failed(args, err)
    finally:
        prog.finish(ok)
    return emit(args, st.to_dict(), lambda: _state_text(st))


def _state_text(st: Any) -> str:
    legs = ", ".join(f"{d} ({h})" for d, h in zip(st.legs, st.health))
    log = st.log_type + (f" on {st.log_device} ({st.log_health})" if st.log_device else "")
    return (
        f"{st.name}: {st.in_sync}/{st.regions} regions in sync ({st.percent:.1f}%), "
        f"region {st.region_size} sectors, log {log}\n  legs: {legs}\n  status: {st.status_text}"
    )


# -- actions ---------------------------------------------------------------------------------------
def _check_spare(mm: Any, legs: list[str], log: str | None, spare: str, operation: str) -> None:
    """``--spare`` must be a device the mirror's monitor can use: not a leg or the log, nor any
    spelling of their bytes, nor mapped by a live table (``DeviceConflict``/``DeviceBusy`` now, not
    a refused repair when a leg fails)."""
    from dmtools.inputs import check_devices
    from mirror.manager import _roles

    check_devices({**_roles(legs, log), "--spare": spare}, backends=[mm.dm], operation=operation,
                  in_use=("--spare",))


def cmd_create(args: argparse.Namespace) -> int:
    mm = _manager(args)
    if args.spare is not None:  # refused before anything is made, not ignored
        if mm.dm.backend != "kernel" or args.no_monitor or not args.handle_errors:
            raise InvalidArgument("--spare is for the monitor of a kernel mirror with handle_errors (the userspace "
                                  "engine's guard drops a failed leg: replace it with 'mirror repair')",
                                  operation="create", device=args.name)
        _check_spare(mm, args.legs, args.log, args.spare, "create")
    st = mm.create(args.name, args.legs, log=args.log, region_size=parse_sectors(args.region_size), nosync=args.nosync,
                   handle_errors=args.handle_errors, keep_log=args.keep_log,
                   keep_log_contents=args.keep_log_contents, monitor=not args.no_monitor)
    if mm.dm.backend == "kernel" and not args.no_monitor and args.handle_errors:
        # monitored from creation, as lvcreate registers a mirror with dmeventd: a mirror that
        # holds writes after a leg failure with nobody to release them is not left behind
        from dmtools.errors import DMError
        from mirror.monitor import start

        try:
            start(mm.dm, args.name, spare=args.spare)
        except DMError:
            mm.remove(args.name)
            raise
    return emit(args, st.to_dict(), lambda: _state_text(st))


def cmd_monitor(args: argparse.Namespace) -> int:
    from mirror.monitor import start, state_root

    mm = _manager(args)
    mm.status(args.name)  # a mirror, or a one-line error
    if mm.dm.backend != "kernel":
        raise InvalidArgument("the userspace engine's guard monitors its mirrors (unless created with "
                              "--no-monitor: then run 'dmtools monitor NAME --mirror-policy remove')",
                              operation="monitor", device=args.name)
    if args.spare is not None:
        st = mm.status(args.name)
        _check_spare(mm, list(st.legs), st.log_device, args.spare, "monitor")
    pid = start(mm.dm, args.name, spare=args.spare, interval=args.interval)
    root = state_root(args.name)
    state = {"name": args.name, "pid": pid, "state_dir": root, "already_running": pid is None}
    return emit(args, state, f"{args.name}: {'already monitored' if pid is None else f'monitored by pid {pid}'}"
                f" (events: dmtools mirror status {args.name}; journal in {root})")


def cmd_status(args: argparse.Namespace) -> int:
    from dmtools.cli.monitor_cmd import format_event
    from dmtools.events import last_events

    mm = _manager(args)
    states = [mm.status(n) for n in args.names] if args.names else mm.list()
    recent = {s.name: last_events(s.name, mm.dm.backend, STATUS_EVENTS, root=_events_root(args, s.name))
              for s in states}
    texts = [_state_text(s) + "".join(f"\n  event: {format_event(e)}" for e in recent[s.name]) for s in states]
    return emit(args, [{**s.to_dict(), "events": [e.to_dict() for e in recent[s.name]]} for s in states],
                "\n".join(texts))


def _events_root(args: argparse.Namespace, name: str) -> str | None:
    """``--state-dir``, else the directory of the mirror's own monitor when it has one."""
    import os

    from mirror.monitor import state_root

    if args.state_dir is not None:
        return str(args.state_dir)
    root = state_root(name)
    return root if os.path.isdir(root) else None


def cmd_resync(args: argparse.Namespace) -> int:
    mm = _manager(args)
    return _copy_and_show(args, f"resync {args.name}", lambda prog: mm.resync(
        args.name, rate=_rate(args.rate), leg=args.leg, progress=prog, timeout=args.timeout))


def cmd_resync_offline(args: argparse.Namespace) -> int:
    from mirror.resync import RecoveryFailed, ResyncResult

    from mirror.manager import resync_offline

    log = None if args.log == "core" else args.log
    mm = _activation(args, log) if args.activate else None  # checked before anything is copied
    prog = _Progress(args, "resync")
    ok = False
    result: ResyncResult | None = None
    from dmtools.inputs import live_backends

    backends = live_backends()  # legs or a log in use by a live table are refused
    try:
        result = resync_offline(args.legs, log, region_size=parse_sectors(args.region_size), rate=_rate(args.rate),
                                rebuild=args.leg, full=args.full, progress=prog, backends=backends)
        ok = True
    except RecoveryFailed as err:
        return _failed(args, err)
    finally:
        for b in backends:
            b.close()
        prog.finish(ok)
    assert result is not None
    data: dict[str, Any] = {
        "regions_copied": result.regions_copied,
        "bytes_copied": result.bytes_copied,
        "seconds": round(result.seconds, 3),
    }
    text = f"{result.regions_copied} regions ({result.bytes_copied} bytes) copied in {result.seconds:.2f} s"
    if mm is not None:
        st = mm.activate(args.activate, args.legs, log=log, region_size=parse_sectors(args.region_size))
        data["activated"] = st.to_dict()
        text += "\n" + _state_text(st)
    return emit(args, data, text)


def _activation(args: argparse.Namespace, log: str | None) -> Any:
    """The manager that will activate ``--activate NAME`` once the resync is done, after refusing
    what would make that fail (no disk log, a bad name, a device of that name), so that a refused
    activation has copied nothing."""
    from dmtools.errors import DeviceExists
    from dmtools.names import validate_name

    if log is None:
        raise InvalidArgument("--activate needs a disk log (--log DEV)", operation="resync")
    validate_name(args.activate)
    mm = _manager(args)
    if mm.dm.exists(args.activate):
        raise DeviceExists("device already exists", operation="activate", device=args.activate)
    return mm


def cmd_repair(args: argparse.Namespace) -> int:
    mm = _manager(args)
    return _copy_and_show(args, f"repair {args.name}", lambda prog: mm.repair(
        args.name, _leg(args.leg), args.new_leg, rate=_rate(args.rate), progress=prog, wait=not args.no_wait))


def cmd_split(args: argparse.Namespace) -> int:
    mm = _manager(args)
    new = mm.split(args.name, _leg(args.leg), args.new_name, force=args.force)
    return emit(args, {"split": new}, f"leg {args.leg} of {args.name} is now device {new}")


def cmd_add_leg(args: argparse.Namespace) -> int:
    mm = _manager(args)
    return _copy_and_show(args, f"add-leg {args.name}", lambda prog: mm.add_leg(
        args.name, args.new_leg, log=args.log, region_size=parse_sectors(args.region_size), rate=_rate(args.rate),
        progress=prog, wait=not args.no_wait, handle_errors=args.handle_errors))


def cmd_remove(args: argparse.Namespace) -> int:
    _manager(args).remove(args.name)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from mirror.format import inspect

    rep = inspect(args.logdev, region_size=parse_sectors(args.region_size) if args.region_size else None)
    return emit(args, rep.to_dict(), lambda: str(rep))


# -- parser ----------------------------------------------------------------------------------------
def _copy_args(p: argparse.ArgumentParser) -> None:
    progress_options(p)
    p.add_argument("--rate", metavar="SIZE", help="resync at most SIZE bytes per second (100M)")
    json_option(p)


def _handle_errors_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--handle-errors", dest="handle_errors", action="store_true", default=True,
                   help="(default) leg failures fail over and raise events, a region whose copy failed "
                   "stays out of sync, writes after a leg failure wait for a repair")
    g.add_argument("--no-handle-errors", dest="handle_errors", action="store_false",
                   help="the kernel's unsafe mode: failures are only counted and a region whose copy "
                   "failed is marked in sync anyway (resync and repair still report it)")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``mirror`` sub-command and its actions."""
    top, sub = actions(subparsers, "mirror", SUMMARY, __doc__)

    p = verb(sub, "create", cmd_create, "create and activate a mirror", "name")
    p.add_argument("legs", metavar="LEG", nargs="+", type=device_argument, help="2 to 9 devices of one size")
    p.add_argument("--log", default="core", metavar="DEV|core", type=log_argument,
                   help="disk log device, or core (default)")
    p.add_argument("--region-size", default="512K", metavar="SIZE", help="region size (default 512K)")
    p.add_argument("--nosync", action="store_true", help="the legs are already identical: skip the resync")
    _handle_errors_args(p)
    p.add_argument("--keep-log", action="store_true",
                   help="writes keep completing after a leg failure, failed regions stay out of sync")
    p.add_argument("--keep-log-contents", action="store_true",
                   help="trust the disk log as it is (activate a mirror brought in sync offline)")
    p.add_argument("--no-monitor", action="store_true",
                   help="do not monitor the mirror (by default a failed leg is dropped so that held "
                   "writes complete: the userspace engine's guard, or on the kernel a 'mirror monitor' "
                   "process); another monitor, such as 'dmtools monitor --mirror-policy repair', may")
    p.add_argument("--spare", metavar="DEV", type=device_argument,
                   help="kernel: the monitor replaces a failed leg by DEV (then drops the next)")
    json_option(p)

    p = verb(sub, "monitor", cmd_monitor, "monitor a kernel mirror: drop (or replace) a failed leg, as dmeventd",
             "name", description="Start a monitor for kernel mirror NAME in the background (as 'lvchange "
             "--monitor y'): on a failed leg it reloads the mirror without it, or with --spare "
             "puts DEV in its place, so that held writes complete; it records what it did "
             "and exits when the mirror is removed. 'mirror create' starts one for kernel "
             "mirrors unless --no-monitor.")
    p.add_argument("--spare", metavar="DEV", type=device_argument, help="replace the first failed leg by DEV")
    p.add_argument("--interval", type=seconds, default=1.0, metavar="SECONDS",
                   help="status polling interval besides the mirror's events (default 1)")
    json_option(p)

    p = verb(sub, "status", cmd_status, "in-sync regions, percent, per-leg health")
    p.add_argument("names", metavar="NAME", nargs="*", help="mirrors (default: every mirror)")
    state_dir_option(p)
    json_option(p)

    p = verb(sub, "resync", cmd_resync, "bring an active mirror in sync, with progress", "name")
    p.add_argument("--leg", type=int, metavar="N", help="rebuild leg N only (userspace engine)")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS")
    _copy_args(p)

    p = verb(sub, "resync-offline", cmd_resync_offline, "resync an inactive mirror's legs from its disk log")
    p.add_argument("legs", metavar="LEG", nargs="+")
    p.add_argument("--log", required=True, metavar="DEV|core")
    p.add_argument("--region-size", default="512K", metavar="SIZE")
    p.add_argument("--leg", type=int, metavar="N", help="also copy every region to leg N (a replaced leg)")
    p.add_argument("--full", action="store_true", help="ignore the log's contents: copy everything")
    p.add_argument("--activate", metavar="NAME", help="then activate the mirror, already in sync")
    _copy_args(p)

    p = verb(sub, "repair", cmd_repair, "replace a failed leg and resync it", "name")
    p.add_argument("leg", help="leg index or device")
    p.add_argument("new_leg", metavar="NEW_LEG", type=device_argument)
    p.add_argument("--no-wait", action="store_true", help="return once the new table is live")
    _copy_args(p)

    p = verb(sub, "split", cmd_split, "detach a leg as a standalone linear device", "name")
    p.add_argument("leg", help="leg index or device")
    p.add_argument("new_name", metavar="NEW_NAME")
    p.add_argument("--force", action="store_true", help="split even when not in sync")
    json_option(p)

    p = verb(sub, "add-leg", cmd_add_leg, "add a leg (turns a linear device into a mirror)", "name")
    p.add_argument("new_leg", metavar="NEW_LEG", type=device_argument)
    p.add_argument("--log", default="core", metavar="DEV|core", type=log_argument, help="log for a new mirror")
    p.add_argument("--region-size", default="512K", metavar="SIZE")
    p.add_argument("--no-wait", action="store_true")
    _handle_errors_args(p)
    _copy_args(p)

    verb(sub, "remove", cmd_remove, "remove a mirror device (legs and log are kept)", "name")
    p = verb(sub, "inspect", cmd_inspect, "read a disk log offline", "LOGDEV")
    p.add_argument("--region-size", metavar="SIZE", help="region size, to check and show")
    json_option(p)
    return top  # type: ignore[no-any-return]
