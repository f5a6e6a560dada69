"""What the monitor and its command line share, in a module light enough for ``dmtools --help``:
snapshot usage thresholds, mirror fault policies, and where device states are kept."""

from __future__ import annotations

import os

__all__ = ["DEFAULT_THRESHOLDS", "MIRROR_POLICIES", "default_root"]

#: dmeventd's snapshot warnings (daemons/dmeventd/plugins/snapshot: 80 % and every 5 % above).
DEFAULT_THRESHOLDS: tuple[int, ...] = (80, 85, 90, 95)

#: What the monitor does on a failed mirror leg: nothing, report it, replace it by a spare, or
#: remove it from the mirror.
MIRROR_POLICIES = ("none", "degraded", "repair", "remove")


def default_root() -> str:
    """``/run/dmtools/monitor`` for root, else under ``$XDG_RUNTIME_DIR`` or ``/tmp``."""
    if os.geteuid() == 0:
        return "/run/dmtools/monitor"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "dmtools") if runtime else f"/tmp/dmtools-{os.geteuid()}"
    return os.path.join(base, "monitor")
