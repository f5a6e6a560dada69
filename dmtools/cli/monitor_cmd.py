"""``dmtools monitor``: watch device-mapper devices, report events, apply policies.

Runs in the foreground until interrupted (SIGINT/SIGTERM end it cleanly: the events reported so
far are remembered, so the next start reports only what happened meanwhile). ``--once`` reports
what changed since the last run, applies the policies once, prints the current state and exits
(for scripts and cron). ``--json`` prints one JSON object per event (with ``--once``: one document
with ``events`` and ``devices``); each carries its ``seq``.

Every event is committed to the state directory's journal before it is printed, numbered. A
monitor killed at any point (SIGKILL, power cut) prints on its next start what it had committed but
not printed, and nothing twice, except the one line it may have been printing to a pipe when it
died (same ``seq``). ``--output FILE`` has no such exception: the file is its own record of what
was written.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from dmtools.cli import common as cli_common
from dmtools.errors import DMError, InvalidArgument
from dmtools.events.defaults import DEFAULT_THRESHOLDS, MIRROR_POLICIES, default_root

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "watch devices: events, snapshot warnings and auto-extend, mirror fault policies"

if TYPE_CHECKING:  # pragma: no cover - the commands import what they run (start-up)
    from dmtools.events.state import DeviceState
    from dmtools.events.store import StateStore
    from dmtools.events.types import Event
    from dmtools.monitor import MonitorConfig

__all__ = ["register", "cmd_monitor", "format_event"]

_DEFAULT_WARN = ",".join(str(t) for t in DEFAULT_THRESHOLDS)


def register(subparsers: Any) -> None:
    """Add the ``monitor`` command to an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "monitor", help=SUMMARY,
        description="Watch device-mapper devices (all, or the NAMES given) and report events; "
        "policies are off unless enabled here or in --config.")
    p.add_argument("names", metavar="NAME", nargs="*", help="devices to watch (default: all)")
    p.add_argument("--once", action="store_true",
                   help="report changes since the last run, apply policies once, print the state, exit")
    cli_common.json_option(p, "JSON output (one object per event)")
    p.add_argument("--warn", nargs="?", const=_DEFAULT_WARN, default=None, metavar="PCTS",
                   help=f"warn when snapshot usage crosses these percentages (default {_DEFAULT_WARN}; "
                   "write --warn=PCTS, or put the NAMEs first)")
    p.add_argument("--autoextend-threshold", type=int, metavar="PCT",
                   help="grow a snapshot's COW when its usage reaches PCT %% (COW on a loop-backed file)")
    p.add_argument("--autoextend-percent", type=int, default=20, metavar="PCT",
                   help="grow the COW by PCT %% of its size (default 20)")
    p.add_argument("--thin-autoextend-threshold", type=int, metavar="PCT",
                   help="grow a thin pool's data or metadata when its usage reaches PCT %% "
                   "(LVM's thin_pool_autoextend_threshold; devices on files or loop-backed files)")
    p.add_argument("--thin-autoextend-percent", type=int, default=20, metavar="PCT",
                   help="grow the thin pool's device by PCT %% (default 20)")
    p.add_argument("--mirror-policy", choices=MIRROR_POLICIES, default="none",
                   help="on a failed mirror leg: report it (degraded), replace it by --spare (repair; "
                   "the leg is removed when the spare cannot be used) or reload without it (remove)")
    p.add_argument("--spare", metavar="DEV", type=cli_common.device_argument,
                   help="spare device for --mirror-policy repair")
    p.add_argument("--config", metavar="FILE", help='JSON policies: {"defaults": {...}, "devices": {"NAME": {...}}}')
    p.add_argument("--interval", type=cli_common.seconds, default=1.0, metavar="SECONDS",
                   help="status polling interval (default 1)")
    p.add_argument("--timeout", type=cli_common.seconds, metavar="SECONDS", help="stop after this long")
    p.add_argument("--state-dir", metavar="DIR",
                   help=f"where device states and events are kept (default {default_root()}); "
                   "'snapshot status' and 'mirror status' take the same option")
    p.add_argument("--output", metavar="FILE",
                   help="append events to FILE as JSON lines, each exactly once across restarts "
                   "(the file's last line tells a restarted monitor where it stopped)")
    p.add_argument("--no-uevents", action="store_true",
                   help="do not listen to uevents (event numbers and polling only)")
    p.add_argument("--until-removed", action="store_true",
                   help="exit once every NAME given has been removed (as dmeventd unregisters a "
                   "device; 'mirror create' starts such a monitor for each kernel mirror)")
    p.set_defaults(func=cmd_monitor)


def _settings(args: argparse.Namespace) -> MonitorConfig:
    from dmtools.events.state import parse_thresholds
    from dmtools.monitor import MonitorConfig, PolicySettings

    defaults = PolicySettings(warn=parse_thresholds(args.warn) if args.warn is not None else (),
                              autoextend_threshold=args.autoextend_threshold,
                              autoextend_percent=args.autoextend_percent, mirror_policy=args.mirror_policy,
                              spare=args.spare, thin_autoextend_threshold=args.thin_autoextend_threshold,
                              thin_autoextend_percent=args.thin_autoextend_percent)
    if args.config:
        return MonitorConfig.load(args.config, defaults)
    return MonitorConfig(defaults)


class _UntilRemoved:
    """A sink that passes events on and sets ``stop`` once none of ``names`` exists any more."""

    def __init__(self, inner: Any, dm: Any, names: list[str], stop: threading.Event) -> None:
        self.inner, self.dm, self.names, self.stop = inner, dm, names, stop

    def last_seq(self) -> int:
        return int(self.inner.last_seq())

    def write(self, event: Event) -> None:
        from dmtools.events.types import DeviceRemoved

        self.inner.write(event)
        if isinstance(event, DeviceRemoved) and event.device in self.names \
                and not any(self.dm.exists(n) for n in self.names):
            self.stop.set()


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def format_event(event: Event) -> str:
    """One line for people: time, severity, device and description."""
    return f"{_stamp(event.time)} {event.severity.value:<7} {event.device}: {event.describe()}"


def _print_event(event: Event, as_json: bool) -> None:
    if as_json:
        from dmtools.events.delivery import event_line

        print(event_line(event), flush=True)
    else:
        print(format_event(event), flush=True)


def _state_text(states: dict[str, DeviceState]) -> str:
    if not states:
        return "no devices"
    width = max(len(n) for n in states)
    return "\n".join(f"{name:<{width}}  {states[name].summary()}" for name in sorted(states))


def _open_store(args: argparse.Namespace, backend: str) -> tuple[StateStore, bool]:
    """The state store, locked when possible; with ``--once`` a running monitor's lock is fine."""
    from dmtools.events.store import StateStore

    try:
        return StateStore(backend, args.state_dir, lock=True), True
    except DMError as err:
        if not args.once or err.errno != 16:
            raise
        print(f"dmtools: {err}; reporting the state only", file=sys.stderr)
        return StateStore(backend, args.state_dir), False


def cmd_monitor(args: argparse.Namespace) -> int:
    """Run the monitor (see the module docstring)."""
    from dmtools.cli.common import open_backend
    from dmtools.events.delivery import CursorSink, JsonLinesFile
    from dmtools.monitor import Monitor

    as_json = bool(getattr(args, "json", False))
    config = _settings(args)
    if args.until_removed and not args.names:
        raise InvalidArgument("--until-removed needs the NAMEs of the devices to watch")
    dm = open_backend(args)
    store, owned = _open_store(args, dm.backend)
    try:
        monitor = Monitor(dm, config, names=args.names or None, store=store if owned else None,
                          poll_interval=args.interval, uevents=False if args.no_uevents else None)
        with monitor:
            output = JsonLinesFile(args.output) if args.output else None
            try:
                if args.once:
                    events: list[Event] = []
                    if owned:
                        monitor.run(output or CursorSink(store, events.append), once=True)
                    states = monitor.watcher.current()
                    if as_json:
                        print(json.dumps({"events": [e.to_dict() for e in events],
                                          "devices": {n: {**s.to_dict(), "summary": s.summary()}
                                                      for n, s in sorted(states.items())}},
                                         indent=2, sort_keys=True))
                    else:
                        for event in events:
                            print(format_event(event))
                        print(_state_text(states))
                    return 0
                stop = threading.Event()
                previous: dict[signal.Signals, Any] = {}
                if threading.current_thread() is threading.main_thread():
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        previous[sig] = signal.signal(sig, lambda *_: stop.set())
                try:
                    sink: Any = output or CursorSink(store, lambda e: _print_event(e, as_json))
                    if args.until_removed:
                        if not any(dm.exists(n) for n in args.names):
                            return 0  # removed before the monitor started: nothing to watch
                        sink = _UntilRemoved(sink, dm, args.names, stop)
                    monitor.run(sink, timeout=args.timeout, stop=stop)
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)
            finally:
                if output is not None:
                    output.close()
        return 0
    finally:
        store.close()
        dm.close()
