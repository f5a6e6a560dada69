"""Child process for the crash-consistency test: build a snapshot stack on the in-process engine,
then write forever, printing ``ack`` after each write returns. The parent SIGKILLs it."""

from __future__ import annotations

import random
import sys
from pathlib import Path

SECTORS = 512  # 256 KiB origin


def plan(seed: int, snaps: list[str]) -> "list[tuple[str, int, int, bytes]]":
    """The deterministic write sequence: (device, sector, count, data)."""
    rng = random.Random(seed)
    out = []
    for i in range(400):
        dev = "vol" if not snaps or rng.random() < 0.75 else rng.choice(snaps)
        sector = rng.randrange(SECTORS)
        count = min(rng.choice([1, 8, 16, 40]), SECTORS - sector)
        stamp = f"{i:05d}{dev}".encode()
        data = (stamp * (count * 512 // len(stamp) + 1))[: count * 512]
        out.append((dev, sector, count, data))
    return out


def main() -> None:
    work = Path(sys.argv[1])
    seed = int(sys.argv[2])
    chunks = [int(c) for c in sys.argv[3].split(",")]

    from dmtools.engine import Engine
    from snapshot import SnapshotManager

    eng = Engine()
    eng.create("vol", f"0 {SECTORS} linear {work / 'vol.img'} 0")
    mgr = SnapshotManager(eng)
    names = []
    for i, chunk in enumerate(chunks):
        name = f"s{i}"
        mgr.create("vol", str(work / f"{name}.cow"), name, chunk_size=chunk)
        names.append(name)
    print("ready", flush=True)
    eps = {n: eng.open_endpoint(n) for n in ["vol", *names]}
    for i, (dev, sector, count, data) in enumerate(plan(seed, names)):
        eps[dev].write(data, sector * 512)
        print(f"ack {i}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
