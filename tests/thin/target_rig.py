"""A thin pool on the userspace engine over image files, for the thin-pool/thin target tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmtools.endpoint import Endpoint
from dmtools.status import ThinPoolStatus, ThinStatus, parse_thin_pool_status, parse_thin_status
from dmtools.target_values import ThinPool

BLOCK = 128  # sectors: 64 KiB, LVM's default chunk
BB = BLOCK * 512


class PoolRig:
    """``pool`` (thin-pool over ``meta``/``data`` files) on ``dm``, plus thin devices on it."""

    def __init__(self, dm: Any, tmp_path: Path, *, data_blocks: int = 64, block: int = BLOCK,
                 meta_bytes: int = 4 << 20, features: tuple[str, ...] = (), low_water: int = 0,
                 data_fill: bytes | None = None, name: str = "pool") -> None:
        self.dm = dm
        self.block = block
        self.bb = block * 512
        self.name = name
        self.meta = tmp_path / f"{name}-meta.img"
        self.data = tmp_path / f"{name}-data.img"
        with open(self.meta, "wb") as f:
            f.truncate(meta_bytes)
        with open(self.data, "wb") as f:
            if data_fill:
                f.write(data_fill * (data_blocks * self.bb // len(data_fill)))
            f.truncate(data_blocks * self.bb)
        self.features = features
        self.low_water = low_water
        self.thins: list[str] = []
        self.endpoints: list[Endpoint] = []
        dm.create(name, self.table(data_blocks))

    def table(self, data_blocks: int, features: tuple[str, ...] | None = None) -> str:
        value = ThinPool(str(self.meta), str(self.data), self.block, self.low_water,
                         self.features if features is None else features)
        return f"0 {data_blocks * self.block} {value.TYPE} {value.params}"

    def grow(self, data_blocks: int) -> None:
        """Grow the data file and reload the pool over all of it (``lvextend`` of a pool)."""
        with open(self.data, "r+b") as f:
            f.truncate(data_blocks * self.bb)
        self.dm.load(self.name, self.table(data_blocks))
        self.dm.resume(self.name)

    @property
    def ref(self) -> str:
        return str(self.dm.device_ref(self.name))

    def in_core(self) -> Any:
        """The in-core pool (an in-process engine only)."""
        from thin.targets.pool_table import STATE_KEY, PoolTable

        major, minor = map(int, self.ref.split(":"))
        return self.dm.target_state(STATE_KEY, PoolTable).by_pool_device(self.dm.device_by_devno(major, minor))

    def message(self, text: str) -> None:
        self.dm.message(self.name, 0, text)

    def thin(self, dev_id: int, name: str, *, blocks: int = 32, create: bool = True,
             origin: str | None = None) -> Endpoint:
        """Create thin device ``dev_id`` (unless ``create`` is false), activate it as ``name`` and
        return an open endpoint on it."""
        if create:
            self.message(f"create_thin {dev_id}")
        extra = f" {origin}" if origin else ""
        self.dm.create(name, f"0 {blocks * self.block} thin {self.ref} {dev_id}{extra}")
        self.thins.append(name)
        ep = self.dm.open_endpoint(name)
        self.endpoints.append(ep)
        return ep

    def snapshot(self, dev_id: int, origin_id: int, origin_name: str | None = None) -> None:
        """``create_snap`` with the active origin suspended, as LVM does."""
        if origin_name:
            self.dm.suspend(origin_name)
        try:
            self.message(f"create_snap {dev_id} {origin_id}")
        finally:
            if origin_name:
                self.dm.resume(origin_name)

    def status(self) -> ThinPoolStatus:
        return parse_thin_pool_status(self.dm.status(self.name)[0].params)

    def status_text(self) -> str:
        return str(self.dm.status(self.name)[0].params)

    def thin_status(self, name: str) -> ThinStatus:
        return parse_thin_status(self.dm.status(name)[0].params)

    def close(self) -> None:
        """Close endpoints, remove the thin devices, then the pool (which commits)."""
        for ep in self.endpoints:
            ep.close()
        self.endpoints.clear()
        for name in reversed(self.thins):
            if name in {e.name for e in self.dm.list()}:
                self.dm.remove(name)
        self.thins.clear()
        if self.name in {e.name for e in self.dm.list()}:
            self.dm.remove(self.name)


def pattern(seed: int, n: int) -> bytes:
    """``n`` non-zero bytes, one value per seed."""
    return bytes([seed % 255 + 1]) * n


def read(ep: Endpoint, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    got = ep.readinto(buf, offset)
    assert got == n
    return bytes(buf)


def file_bytes(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)

