"""``python -m kcopyd SRC DST ...``: the copy command without the dmtools root CLI.

Once the command has returned (the copy done, its destinations closed and its summary printed),
the process leaves without the interpreter's teardown, which frees every module and object one
by one: 21 M instructions, a tenth of a small copy's whole run (callgrind). The ``atexit``
handlers still run and standard output and error are flushed first (a failed flush exits 120, as
the ordinary exit does); with a non-daemon thread still running, or when the command raised,
the ordinary exit is taken.
"""

import sys

from kcopyd.cli import main


def _leave(code: int) -> None:
    """Exit with ``code`` as ``sys.exit`` would, minus the interpreter's teardown."""
    import atexit
    import os
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
        except OSError as err:  # the summary was not written: exit 120, as the ordinary exit does
            os.write(2, f"kcopyd: cannot write the output: {err}\n".encode())
            code = 120
    os._exit(code)


_leave(main())
