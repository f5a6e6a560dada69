"""The embedded userspace device-mapper engine, its daemon and its block-device exposure.

The names below load on first use: a client of the daemon (``dmtools.engine.client``) lives in
this package and must not pay for the engine it talks to.
"""

from __future__ import annotations

from dmtools import lazy

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)

if TYPE_CHECKING:  # pragma: no cover - loaded on first use, see __getattr__
    from dmtools.engine.device_endpoint import DeviceEndpoint
    from dmtools.engine.engine import Engine
    from dmtools.engine.target_driver import DeviceHandle, TargetContext, TargetDriver

__getattr__, __all__ = lazy.package(__name__, {
    "dmtools.engine.device_endpoint": "DeviceEndpoint",
    "dmtools.engine.engine": "Engine",
    "dmtools.engine.target_driver": "DeviceHandle TargetDriver TargetContext",
})
