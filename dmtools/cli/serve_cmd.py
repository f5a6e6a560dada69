"""``dmtools serve NAME``: export a mapped device over NBD (nbdkit), read-only unless ``--writable``.

The device is looked up on the chosen backend (``/dev/mapper/NAME`` on the kernel,
``<run_dir>/mapper/NAME`` on the userspace engine). The command prints the URI clients use, then
serves until interrupted (SIGINT, SIGTERM and SIGHUP stop it cleanly and remove the socket). TCP needs TLS unless
``--insecure``; see :mod:`dmtools.nbd.serve`.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import Any

from dmtools.cli import common as cli_common
from dmtools.errors import DMError

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "export a device over NBD (nbdkit); read-only unless --writable"

__all__ = ["register", "cmd_serve"]


def register(subparsers: Any) -> None:
    """Add the ``serve`` command to an argparse sub-parser collection."""
    p = subparsers.add_parser("serve", help=SUMMARY)
    p.add_argument("name", metavar="NAME", help="the mapped device to serve")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", "-U", metavar="PATH", type=cli_common.device_argument,
                       help="serve on a new Unix socket (mode 0600)")
    where.add_argument("--listen", "-l", metavar="ADDR:PORT",
                       help="serve on TCP (requires --tls-psk or --tls-certificates, or --insecure); "
                            "port 0 picks a free one")
    p.add_argument("--writable", "-w", action="store_true", help="let clients write (default: read-only)")
    p.add_argument("--export-name", "-e", metavar="NAME", help="the export name (default: the device name)")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--tls-psk", metavar="FILE", type=cli_common.device_argument,
                     help="require TLS with the pre-shared keys in FILE (psktool format)")
    tls.add_argument("--tls-certificates", metavar="DIR", type=cli_common.device_argument,
                     help="require TLS with the X.509 certificates in DIR")
    p.add_argument("--insecure", action="store_true", help="allow TCP without TLS")
    p.add_argument("--threads", type=int, default=16, metavar="N", help="requests served at once (default 16)")
    p.set_defaults(func=cmd_serve)


class _Stopped(BaseException):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) before the server waits."""


def _stopped(signum: int, _frame: object) -> None:
    raise _Stopped(signum)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted; 0 when stopped by a signal, 1 when nbdkit failed."""
    from dmtools.nbd.serve import STOP_SIGNALS, ServeOptions, Server, parse_listen

    options = ServeOptions(device="", socket=args.socket,
                           listen=parse_listen(args.listen) if args.listen is not None else None,
                           export_name=args.export_name if args.export_name is not None else args.name,
                           writable=args.writable, insecure=args.insecure, tls_psk=args.tls_psk,
                           tls_certificates=args.tls_certificates, threads=args.threads)
    options.check()  # refuse before the backend is even opened
    # A stop signal before the server waits (while it starts, or its URI is printed) unwinds
    # through the clean-ups below instead of killing the process with its socket left behind.
    old = {s: signal.signal(s, _stopped) for s in STOP_SIGNALS}
    try:
        path = cli_common.open_backend(args).device_path(args.name)
        server = Server(dataclasses.replace(options, device=path))
        try:
            mode = "writable" if args.writable else "read-only"
            cli_common.emit(args, {"name": args.name, "device": path, "uri": server.uri, "writable": args.writable,
                                 "tls": options.tls, "pid": server.process.pid},
                          f"serving {args.name} ({path}, {mode}) at {server.uri}")
            sys.stdout.flush()
            status = server.wait()
        finally:
            server.stop()
    except _Stopped:
        status = 0
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
    if status not in (0, -15, -2):
        raise DMError(f"nbdkit exited with status {status}", operation="serve", device=args.name)
    return 0
