"""``dmtools daemon``: run, stop or query the userspace engine's daemon."""

from __future__ import annotations

import argparse
import errno
from typing import Any

from dmtools.cli.common import emit
from dmtools.errors import DaemonError

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "run or control the userspace engine's daemon"


def register_daemon(subparsers: Any) -> None:
    """Add the ``daemon`` sub-command to the root parser's sub-parsers."""
    parser = subparsers.add_parser(
        "daemon",
        help=SUMMARY,
        description="Run the userspace device-mapper daemon (started on demand by other "
        "commands), or stop it / show its status.",
    )
    parser.add_argument("action", nargs="?", choices=("run", "stop", "status"), default="run",
                        help="run (default), stop or status")
    parser.add_argument("--foreground", action="store_true", help="run: stay attached to the terminal")
    parser.add_argument("--force", action="store_true", help="stop: remove devices even while they are open")
    parser.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=_daemon)


def _daemon(args: argparse.Namespace) -> int:
    from dmtools.engine import daemon
    from dmtools.engine.client import UserspaceClient

    if args.action == "run":
        return daemon.run(foreground=args.foreground, run_dir=args.run_dir)
    try:
        client = UserspaceClient(args.run_dir)
    except DaemonError as err:
        if err.errno == errno.EPERM:
            raise  # an unsafe run directory is an error, not a stopped daemon
        if args.action == "status":
            print(f"not running ({err.message})")
            return 3
        print("not running")
        return 0
    try:
        if args.action == "status":
            info = client.ping()
            exposed = "exposed through FUSE + loop" if info["exposed"] else "not exposed"
            return emit(args, info, f"running: pid {info['pid']}, {info['devices']} device(s), {exposed}, "
                                    f"run directory {info['run_dir']}")
        pid = client.shutdown(force=args.force)
    finally:
        client.close()
    print(f"stopped (pid {pid})")
    return 0
