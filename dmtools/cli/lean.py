"""Start-up and exit of short commands (``dmtools copy``, ``python -m kcopyd``): what the copy
path's first and last milliseconds go to, kept small.

- :class:`HelpFormatter`: argparse's formatter (the description kept as written) that finds the
  terminal's width itself. argparse makes a formatter for every argument added (to check it), and
  its own imports ``shutil`` (with ``bz2``, ``lzma``, ``fnmatch``) for ``get_terminal_size``:
  7.4 M of the copy command's start-up instructions (callgrind).
- :func:`leave`: once a command has returned (its work done, its files closed and its summary
  printed), the process exits without the interpreter's teardown, which frees every module and
  object one by one: 21 M instructions, a tenth of a small copy's whole run (callgrind). The
  ``atexit`` handlers still run and standard output and error are flushed first (a failed flush
  exits 120, as the ordinary exit does); with a non-daemon thread still running, the ordinary
  exit is taken.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["HelpFormatter", "leave", "terminal_columns"]


def terminal_columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size`` finds it: ``$COLUMNS``, else standard
    output's terminal, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``RawDescriptionHelpFormatter`` whose width comes from :func:`terminal_columns` (no
    ``shutil`` import)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, terminal_columns() - 2 if width is None else width)


def leave(code: int, prog: str) -> None:
    """Exit with ``code`` as ``sys.exit`` would, minus the interpreter's teardown (``prog`` names
    the command in the message of a failed flush)."""
    import atexit
    import threading

    main_thread = threading.main_thread()
    if any(t is not main_thread and t.is_alive() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)  # the ordinary exit waits for it
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None or stream.closed:
            continue
        try:
            stream.flush()
        except OSError as err:  # the output was not written: exit 120, as the ordinary exit does
            os.write(2, f"{prog}: cannot write the output: {err}\n".encode())
            code = 120
    os._exit(code)
