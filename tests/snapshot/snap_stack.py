"""Build the LVM-style snapshot stack by hand on an engine (for target-level tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Stack:
    """``base-real`` over an origin file, ``base`` as snapshot-origin, snapshots on COW files."""

    def __init__(self, engine: Any, tmp: Path, origin_bytes: bytes, prefix: str = "t") -> None:
        self.eng = engine
        self.tmp = tmp
        self.prefix = prefix
        self.origin_path = tmp / f"{prefix}-origin.img"
        self.origin_path.write_bytes(origin_bytes)
        self.sectors = len(origin_bytes) // 512
        self.real = f"{prefix}-base-real"
        self.base = f"{prefix}-base"
        engine.create(self.real, f"0 {self.sectors} linear {self.origin_path} 0")
        engine.create(self.base, f"0 {self.sectors} linear {engine.device_ref(self.real)} 0")
        self.snaps: dict[str, str] = {}

    def cow_file(self, name: str, size: int) -> Path:
        path = self.tmp / f"{self.prefix}-{name}.cow"
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def add_snapshot(self, name: str, cow_size: int, store: str = "P", chunk: int = 8, cow: str = "") -> None:
        """Take a snapshot: suspend base, create the snapshot, reload base as snapshot-origin. The
        COW is a new file of ``cow_size`` bytes, or the device reference ``cow``."""
        eng = self.eng
        cow = cow or str(self.cow_file(name, cow_size))
        self.snaps[name] = cow
        eng.suspend(self.base)
        try:
            eng.create(name, f"0 {self.sectors} snapshot {eng.device_ref(self.real)} {cow} {store} {chunk}")
            eng.load(self.base, f"0 {self.sectors} snapshot-origin {eng.device_ref(self.real)}")
        finally:
            eng.resume(self.base)

    def drop_snapshot(self, name: str) -> None:
        eng = self.eng
        eng.suspend(self.base)
        try:
            eng.remove(name)
            del self.snaps[name]
            if not self.snaps:
                eng.load(self.base, f"0 {self.sectors} linear {eng.device_ref(self.real)} 0")
        finally:
            eng.resume(self.base)

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        n = self.sectors * 512 - offset if length is None else length
        buf = bytearray(n)
        with self.eng.open_endpoint(name, writable=False) as ep:
            ep.readinto(buf, offset)
        return bytes(buf)

    def write(self, name: str, data: bytes, offset: int) -> None:
        with self.eng.open_endpoint(name) as ep:
            ep.write(data, offset)

    def status(self, name: str) -> str:
        return self.eng.status(name)[0].params
