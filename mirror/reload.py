"""Replace a live mirror's table the way LVM and dmeventd reconfigure one."""

from __future__ import annotations

from dmtools.backend import DeviceMapper
from dmtools.reload import reload_stack
from dmtools.table import Table

__all__ = ["swap_table"]


def swap_table(dm: DeviceMapper, name: str, table: Table) -> None:
    """Load ``table`` into ``name``, suspend with ``noflush`` and resume it live.

    ``noflush`` as LVM/dmeventd suspend a mirror they reconfigure: writes the mirror holds after a
    leg failure (``handle_errors`` without ``keep_log``) are requeued to the new table instead of
    failing with EIO (dm-raid1.c ``hold_bio``, dm.c ``DM_ENDIO_REQUEUE``). All-or-nothing: if the
    suspend or resume fails the new table is dropped and the device resumed on its old table (held
    writes resubmit there), and the error is raised.
    """
    reload_stack(dm, [(name, table)], [name], noflush=True)
