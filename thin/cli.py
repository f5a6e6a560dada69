"""``dmtools thin ...``: thin pools and the offline metadata tools.

    dmtools thin check META                 check a pool's metadata (as thin_check)
    dmtools thin dump META [--json]         the metadata as thin_dump's XML, or JSON
    dmtools thin restore -i XML -o META     write metadata from that XML (as thin_restore)
    dmtools thin ls META                    devices with mapped, exclusive and shared blocks
    dmtools thin export --metadata DEV --data DEV --id N OUT
                                            one thin volume's bytes, without device-mapper

The pool commands (``thin pool create`` ...) come from ``thin.pool_cli`` when it is installed.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``thin`` and its sub-commands to an argparse sub-parser collection."""
    p = subparsers.add_parser("thin", help="thin pools; offline check/dump/restore/ls/export of their metadata",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="thin_command", metavar="ACTION")
    sub.required = True
    _add_offline_commands(sub)
    try:  # the pool commands live in their own module, thin/pool_cli.py, with one entry point
        pool_cli = importlib.import_module("thin.pool_cli")
    except ModuleNotFoundError as err:
        if err.name != "thin.pool_cli":
            raise
    else:
        pool_cli.add_commands(sub)
    return p  # type: ignore[no-any-return]


def _add_offline_commands(sub: Any) -> None:
    """The commands that read or write metadata without device-mapper."""
