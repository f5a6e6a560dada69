"""Child process for the thin crash test: a thin pool on the in-process engine (the process the
parent SIGKILLs holds the pool, as the daemon would), then a deterministic plan of writes, flushes
and snapshots, printing ``ack N`` after op N returned. Run: ``thin_crash_writer.py WORK SEED [runs]``
(``runs``: writes of up to the whole device too, which cover several whole blocks)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

BLOCK = 128  # sectors
BLOCKS = 8  # per thin device
SECTORS = BLOCK * BLOCKS
DATA_BLOCKS = 48

#: op = ("write", dev, sector, data, flush) | ("snap", new dev, origin dev)
Op = tuple


#: sectors a write covers; with ``runs`` also several whole blocks (the thin target maps them
#: together: ``ThinTarget._write_whole_blocks``).
COUNTS = [1, 8, 64, 128, 200]
RUN_COUNTS = COUNTS + [256, 384, 512, SECTORS]


def plan(seed: int, runs: bool = False) -> list[Op]:
    """The ops of run ``seed``: device 1 exists at the start; up to 3 snapshots come on the way."""
    rng = random.Random(seed)
    devs = [1]
    ops: list[Op] = []
    for i in range(300):
        if len(devs) < 4 and rng.random() < 0.04:
            new = max(devs) + 1
            ops.append(("snap", new, rng.choice(devs)))
            devs.append(new)
            continue
        dev = rng.choice(devs)
        sector = rng.randrange(SECTORS)
        count = min(rng.choice(RUN_COUNTS if runs else COUNTS), SECTORS - sector)
        stamp = f"{i:05d}d{dev}".encode()
        data = (stamp * (count * 512 // len(stamp) + 1))[: count * 512]
        ops.append(("write", dev, sector, data, rng.random() < 0.7))
    return ops


def pool_table(work: Path) -> str:
    return f"0 {DATA_BLOCKS * BLOCK} thin-pool {work / 'meta.img'} {work / 'data.img'} {BLOCK} 0 0"


def thin_table(pool_ref: str, dev: int) -> str:
    return f"0 {SECTORS} thin {pool_ref} {dev}"


def main() -> None:
    work, seed, runs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["runs"]
    from dmtools.engine import Engine

    eng = Engine()
    eng.create("pool", pool_table(work))
    ref = eng.device_ref("pool")
    eng.message("pool", 0, "create_thin 1")
    eng.create("t1", thin_table(ref, 1))
    eps = {1: eng.open_endpoint("t1")}
    print("ready", flush=True)
    for i, op in enumerate(plan(seed, runs)):
        if op[0] == "snap":
            _, new, origin = op
            eng.suspend(f"t{origin}")
            eng.message("pool", 0, f"create_snap {new} {origin}")
            eng.resume(f"t{origin}")
            eng.create(f"t{new}", thin_table(ref, new))
            eps[new] = eng.open_endpoint(f"t{new}")
        else:
            _, dev, sector, data, flush = op
            eps[dev].write(data, sector * 512)
            if flush:
                eps[dev].flush()
        print(f"ack {i}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()
