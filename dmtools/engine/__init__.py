"""The embedded userspace device-mapper engine, its daemon and its block-device exposure."""

from __future__ import annotations

from dmtools.engine.endpoint import DeviceEndpoint
from dmtools.engine.engine import Engine
from dmtools.engine.target import DeviceHandle, Target, TargetContext

__all__ = ["DeviceEndpoint", "DeviceHandle", "Engine", "Target", "TargetContext"]
