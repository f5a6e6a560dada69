"""``python -m kcopyd SRC DST ...``: the copy command without the dmtools root CLI."""

import sys

from kcopyd.cli import main

sys.exit(main())
