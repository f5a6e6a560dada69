"""The embedded userspace device-mapper engine, its daemon and its block-device exposure."""

from __future__ import annotations

from dmtools.engine.device_endpoint import DeviceEndpoint
from dmtools.engine.engine import Engine
from dmtools.engine.target_driver import DeviceHandle, TargetDriver, TargetContext

__all__ = ["DeviceEndpoint", "DeviceHandle", "Engine", "TargetDriver", "TargetContext"]
