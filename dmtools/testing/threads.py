"""Run test bodies in threads released together, and fail the test if one fails or hangs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

__all__ = ["run_together"]


def run_together(fns: Sequence[Callable[[], object]], timeout: float = 60.0) -> None:
    """Run each of ``fns`` in its own thread, all released at once by a barrier; wait up to
    ``timeout`` seconds for them. Raises ``AssertionError`` if a thread is still running then,
    and re-raises the first exception a thread raised."""
    start = threading.Barrier(len(fns))
    errors: list[BaseException] = []

    def run(fn: Callable[[], object]) -> None:
        start.wait()
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - re-raised by the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(fn,), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = sum(t.is_alive() for t in threads)
    assert not stuck, f"{stuck} of {len(threads)} threads still running after {timeout} s"
    if errors:
        raise errors[0]
