"""``python -m kcopyd SRC DST ...``: the copy command without the dmtools root CLI.

Once the command has returned (the copy done, its destinations closed and its summary printed),
the process leaves without the interpreter's teardown (:func:`dmtools.cli.lean.leave`); when the
command raised, the ordinary exit is taken.
"""

from dmtools.cli.lean import leave
from kcopyd.cli import main

leave(main(), "kcopyd")
