"""``python -m kcopyd SRC DST ...``: the copy command without the dmtools root CLI.

The cyclic garbage collector is off while the interpreter loads the copy's modules and sets it
up. Once the command has returned (the copy done, its destinations closed and its summary printed),
the process leaves without the interpreter's teardown (:func:`dmtools.cli.lean.leave`); when the
command raised, the ordinary exit is taken.
"""

import gc

# What start-up makes (modules, classes, functions) lives until the process leaves: the cyclic
# garbage collector's passes over it while the modules load are wasted work (about 4M instructions
# of 170M for a 16 MiB copy from an export); main() turns it back on once the copy has started.
gc.disable()

from dmtools.cli.lean import leave  # noqa: E402
from kcopyd.cli import main  # noqa: E402

leave(main(start_up_gc_off=True), "kcopyd")
