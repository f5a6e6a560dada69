"""Services the daemon runs beside its engine, found under the ``dmtools.services`` entry points.

A service is what an upper layer needs running in the process that owns the devices, as dmeventd
runs beside the kernel's device-mapper: the mirror package's guard (``mirror.guard``) ends writes
held after a leg failure. Each entry point is called with the engine and returns an object with
``stop()`` (or ``None``); ``dmtools`` never imports the layers that provide them.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from dmtools.plugins import entry_points

__all__ = ["SERVICE_GROUP", "Service", "start_services", "stop_services"]

log = logging.getLogger(__name__)

#: Entry-point group of the services.
SERVICE_GROUP = "dmtools.services"


class Service(Protocol):
    """A running service."""

    def stop(self) -> None:
        """Stop it (before the engine closes)."""


def start_services(engine: Any) -> list[Service]:
    """Start every installed service on ``engine``; one that fails to start is logged and skipped."""
    started: list[Service] = []
    for ep in entry_points(SERVICE_GROUP):
        try:
            service = ep.load()(engine)
        except Exception:  # noqa: BLE001 - a broken plug-in must not keep the daemon down
            log.exception("service %s (%s) did not start", ep.name, ep.value)
            continue
        if service is not None:
            started.append(service)
    return started


def stop_services(services: list[Service]) -> None:
    """Stop ``services`` in reverse order; errors are logged."""
    for service in reversed(services):
        try:
            service.stop()
        except Exception:  # noqa: BLE001 - shutting down goes on
            log.exception("stopping service %r failed", service)
