"""Root tier: a mirror leg that is a read-only block device (a loop device attached ``-r``). kcopyd
refuses such a destination before any I/O; the mirror's recovery must still blame that leg (a
write failure, as dm-raid1 finds it), not the source leg it read from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mirror.manager import MirrorManager
from mirror.resync import RecoveryFailed

pytestmark = pytest.mark.root

MiB = 1 << 20


def test_a_read_only_leg_fails_its_recovery_as_a_write_failure(engine: Any, tmp_path: Path, make_loop: Any) -> None:
    data = os.urandom(2 * MiB)
    src, ro_image = tmp_path / "a.img", tmp_path / "b.img"
    src.write_bytes(data)
    ro_image.write_bytes(bytes(2 * MiB))
    ro = make_loop(ro_image, read_only=True)
    mm = MirrorManager(engine)
    mm.create("m-dmtt", [str(src), ro.path], region_size=128, monitor=False)  # no guard: the leg stays
    try:
        with pytest.raises(RecoveryFailed) as info:
            mm.resync("m-dmtt", timeout=30)
        assert info.value.legs == [1] and "could not write leg 1" in str(info.value)
        assert mm.status("m-dmtt").health == "AS"  # the source is fine
        assert ro_image.read_bytes() == bytes(2 * MiB) and src.read_bytes() == data
    finally:
        mm.remove("m-dmtt")
