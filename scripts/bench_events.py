"""Event figures: delivery latency and the cost of exactly-once delivery (journal, sinks).

Run: ``scripts/bench events [--samples N] [--changes N<=100] [--dir DIR]``. Prints

- latency from a change to the monitor handing out its event, on the in-process userspace engine:
  a rename (woken by the device's event number, polling at 30 s) and a snapshot threshold crossed
  by a write (found by status polling at 0.05 s);
- commits per second over a fake backend with the journal (``DIR``, default a temporary directory)
  against the same watcher without a store, and events per second into each sink, as ratios.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "events")]  # the engine and fake-backend helpers

from dmtools.engine import Engine  # noqa: E402
from dmtools.events import DeviceRenamed, SnapshotUsageCrossed, StateStore, Watcher  # noqa: E402
from dmtools.events.delivery import CursorSink, JsonLinesFile  # noqa: E402
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings  # noqa: E402

from ev_engine import image  # noqa: E402
from ev_fakes import SNAP_TABLE, FakeDM, snap_status  # noqa: E402


def latency(monitor: Monitor, want: Callable[[Any], bool], act: Callable[[], object]) -> float:
    """Seconds from ``act()`` to the first event ``want`` accepts."""
    got = threading.Event()
    stop = threading.Event()
    seen: list[float] = []
    ready = threading.Event()

    def run() -> None:
        first = True
        for ev in monitor.events(stop=stop, timeout=60):
            if first:
                first = False
            if want(ev):
                seen.append(time.monotonic())
                got.set()
                stop.set()
        ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.2)  # the first scan and the event-number waiters are up
    started = time.monotonic()
    act()
    got.wait(30)
    stop.set()
    thread.join(30)
    return seen[0] - started if seen else float("inf")


def engine_latencies(samples: int, tmp: Path) -> None:
    eng = Engine()  # the snapshot and mirror targets load through their entry points
    try:
        eng.create("r0", "0 8 zero")
        rename = []
        for i in range(samples):
            mon = Monitor(eng, poll_interval=30.0, uevents=False)
            mon.step()
            rename.append(latency(mon, lambda e: isinstance(e, DeviceRenamed),
                                  functools.partial(eng.rename, f"r{i}", f"r{i + 1}")))
            mon.close()
        eng.create("o", f"0 {(8 << 20) // 512} linear {image(tmp, 'origin', 8 << 20)} 0")
        from snapshot.manager import SnapshotManager

        SnapshotManager(eng).create("o", image(tmp, "cow", 1 << 20), "s", chunk_size=8)
        usage = []
        warn = tuple(range(1, 100))
        with eng.open_endpoint("o") as ep:
            for i in range(samples):
                mon = Monitor(eng, MonitorConfig(PolicySettings(warn=warn)), poll_interval=0.05,
                              uevents=False, event_numbers=False)
                mon.step()
                usage.append(latency(mon, lambda e: isinstance(e, SnapshotUsageCrossed),
                                     functools.partial(ep.write, b"u" * 16384, i * 16384)))
                mon.close()
    finally:
        eng.close()
    for what, values in (("rename via event number", rename), ("threshold via 0.05 s polling", usage)):
        ms = sorted(v * 1000 for v in values)
        print(f"latency, {what}: median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms "
              f"({len(ms)} samples)")


def throughput(directory: Path, changes: int) -> None:
    def run(store: StateStore | None) -> float:
        """Scans per second, each seeing the snapshot cross one more threshold (one event)."""
        dm = FakeDM()
        dm.add("s", [(0, 2048, "snapshot", SNAP_TABLE, snap_status(0))])
        w = Watcher(dm, store=store, event_numbers=False, uevents=False, thresholds=range(1, changes + 1))
        w.poll()
        started = time.perf_counter()
        for i in range(changes):
            dm.set_status("s", f"{i + 1}/100 16")  # one percent more: one threshold crossed
            assert len(w.poll()) == 1
        return changes / (time.perf_counter() - started)

    plain = run(None)
    with StateStore("bench", str(directory / "state"), lock=True) as store:
        journaled = run(store)
    print(f"scans with one event/s: journaled {journaled:.0f}, without a store {plain:.0f} "
          f"(ratio {journaled / plain:.3f}) in {directory}")
    from dmtools.events import DeviceAdded

    batch = [DeviceAdded(device="d", seq=i + 1) for i in range(changes)]
    with StateStore("bench2", str(directory / "state"), lock=True) as store:
        sink: Any = CursorSink(store, lambda e: None)
        started = time.perf_counter()
        for ev in batch:
            sink.write(ev)
        cursor = changes / (time.perf_counter() - started)
    with JsonLinesFile(str(directory / "events.jsonl")) as out:
        started = time.perf_counter()
        for ev in batch:
            out.write(ev)
        filed = changes / (time.perf_counter() - started)
    print(f"events/s handed out: --output file (write+fsync) {filed:.0f}, stdout with cursor "
          f"(print, cursor file rename+fsync) {cursor:.0f} (ratio {filed / cursor:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--changes", type=int, default=100,
                        help="threshold crossings timed (1-100, one per percent of usage)")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    if not 1 <= args.changes <= 100:
        parser.error("--changes must be between 1 and 100")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        engine_latencies(args.samples, Path(tmp))
        throughput(Path(tmp), args.changes)


if __name__ == "__main__":
    main()
