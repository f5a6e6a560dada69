"""Loop devices for tests: attach through a tracker that always detaches them again.

``LoopTracker`` is what the ``make_loop`` fixture of :mod:`dmtools.testing.plugin` hands out; it
can also be used directly as a context manager. :func:`sweep` detaches leftovers of crashed runs.
:func:`image_ref` and :func:`backing` name image files the way one backend's tables name devices.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools import loop
from dmtools.errors import DeviceNotFound, DMError, LoopError
from dmtools.loop import LoopDevice

__all__ = ["LoopTracker", "backing", "image_ref", "sweep", "loops_under", "no_leaked_loops"]


class LoopTracker:
    """Attaches loop devices and detaches every one it attached at :meth:`detach_all`.

    Thread-safe. ``tracker(path, **options)`` is ``tracker.attach(path, **options)``.
    """

    def __init__(self, *, timeout: float = 5.0) -> None:
        self._devices: list[LoopDevice] = []
        self._lock = threading.Lock()
        self._timeout = timeout

    @property
    def devices(self) -> list[LoopDevice]:
        """The devices attached and not yet detached, oldest first."""
        with self._lock:
            return list(self._devices)

    def attach(self, path: str | os.PathLike[str], **options: Any) -> LoopDevice:
        """:func:`dmtools.loop.attach` and remember the device for teardown."""
        dev = loop.attach(path, **options)
        with self._lock:
            self._devices.append(dev)
        return dev

    __call__ = attach

    def detach(self, dev: LoopDevice) -> bool:
        """Detach one tracked device now (see :func:`dmtools.loop.detach`)."""
        with self._lock:
            self._devices = [d for d in self._devices if d is not dev]
        return loop.detach(dev, timeout=self._timeout)

    def detach_all(self) -> None:
        """Detach every tracked device, newest first.

        Devices already gone are skipped. Raises :class:`LoopError` naming every device that could
        not be detached or was still held open by someone else after the timeout.
        """
        with self._lock:
            devices, self._devices = self._devices[::-1], []
        failures: list[str] = []
        for dev in devices:
            try:
                if not loop.detach(dev, timeout=self._timeout):
                    failures.append(f"{dev.path}: still open elsewhere (left to autoclear)")
            except DeviceNotFound:
                dev.close()
            except DMError as err:
                failures.append(f"{dev.path}: {err}")
        if failures:
            raise LoopError("loop devices not detached: " + "; ".join(failures), operation="detach")

    def __enter__(self) -> LoopTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach_all()


def image_ref(path: str | os.PathLike[str], make_loop: Callable[..., LoopDevice] | None = None) -> str:
    """How one backend's tables name the image file ``path``: a loop device that ``make_loop``
    attaches over it (the kernel) or, without ``make_loop``, the file itself (the userspace engine)."""
    return str(make_loop(path).path if make_loop is not None else path)


def backing(make_image: Callable[..., Path], make_loop: Callable[..., LoopDevice] | None = None) -> Callable[..., str]:
    """A factory of table device references on one backend: ``backing(size, name=None, fill=None)``
    makes an image with ``make_image`` and returns its :func:`image_ref`."""
    return lambda size, **image_options: image_ref(make_image(size, **image_options), make_loop)


def loops_under(directory: str | os.PathLike[str]) -> list[LoopDevice]:
    """Bound loop devices whose backing file lies under ``directory``."""
    prefix = os.path.join(os.path.realpath(os.fspath(directory)), "")
    return [d for d in loop.list_loops() if (d.backing_file or "").startswith(prefix)]


@pytest.fixture(autouse=True)
def no_leaked_loops(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """Fail a ``root`` test that leaves a loop device bound to a file in its ``tmp_path``.

    Autouse in the test modules that import it; runs after every other fixture's teardown, sweeps
    what leaked so later tests start clean, then fails.
    """
    yield
    if request.node.get_closest_marker("root") is None or not os.path.exists(loop.LOOP_CONTROL):
        return
    leaked = [d.path for d in loops_under(tmp_path)]
    sweep(under=tmp_path)
    assert leaked == [], f"loop devices leaked: {leaked}"


def sweep(*, under: str | os.PathLike[str]) -> list[str]:
    """Detach loop devices whose backing file lies under the directory ``under``; returns the
    device paths detached. Errors are skipped (best effort)."""
    done = []
    for dev in loops_under(under):
        try:
            loop.detach(dev)
        except DMError:
            continue
        done.append(dev.path)
    return done
