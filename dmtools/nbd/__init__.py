"""NBD: endpoints on exports served by nbdkit, qemu-nbd, rbd-nbd… (libnbd), and the kernel's nbd.ko.

- :class:`NbdEndpoint` — an export named by a URI (``nbd://HOST[:PORT]/EXPORT``,
  ``nbd+unix:///EXPORT?socket=PATH``, ``nbds://`` with TLS) as an endpoint: kcopyd regions name
  exports by URI, as they name files and block devices by path.
- :func:`parse_uri`, :func:`is_nbd_uri` — URIs, checked before anything is connected.
- :func:`is_supported` — whether libnbd's bindings (``python3-libnbd``) can be loaded.
"""

from __future__ import annotations

from dmtools import lazy

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)

if TYPE_CHECKING:  # pragma: no cover - loaded on first use, see __getattr__
    from dmtools.nbd._lib import is_supported
    from dmtools.nbd.endpoint import DEFAULT_CONNECTIONS, DEFAULT_TIMEOUT, NbdEndpoint, source_connections
    from dmtools.nbd.errors import NbdConnectionError, NbdUnavailable
    from dmtools.nbd.uri import NbdUri, is_nbd_uri, parse_uri


__getattr__, __all__ = lazy.package(__name__, {
    "dmtools.nbd._lib": "is_supported",
    "dmtools.nbd.endpoint": "DEFAULT_CONNECTIONS DEFAULT_TIMEOUT NbdEndpoint source_connections",
    "dmtools.nbd.errors": "NbdConnectionError NbdUnavailable",
    "dmtools.nbd.uri": "NbdUri is_nbd_uri parse_uri",
})
