"""The userspace ``thin-pool`` and ``thin`` targets (drivers/md/dm-thin.c) for the dmtools engine.

``ThinPoolTarget`` (:mod:`thin.targets.pool`) owns an in-core pool (:mod:`thin.targets.pool_core`)
found per engine through :mod:`thin.targets.pool_table`; ``ThinTarget`` (:mod:`thin.targets.thin`)
is a thin device on it. Both are registered under the ``dmtools.targets`` entry points.
"""

from thin.targets.pool import ThinPoolTarget
from thin.targets.thin import ThinTarget

__all__ = ["ThinPoolTarget", "ThinTarget"]
