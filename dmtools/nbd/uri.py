"""NBD URIs as nbdcopy, qemu and the NBD project write them (NetworkBlockDevice/nbd doc/uri.md).

``nbd://HOST[:PORT]/EXPORT`` (TCP, port 10809 by default), ``nbds://…`` (TCP with TLS required),
``nbd+unix:///EXPORT?socket=PATH`` and ``nbds+unix:///EXPORT?socket=PATH`` (a Unix socket). The
export name is the path without its first ``/``, percent-decoded. TLS keys in the query
(``tls-psk-file``, ``tls-certificates``, ``tls-verify-peer``, ``tls-hostname``) and a ``user@``
for PSK are kept as given. Parsing here is pure Python, so a bad URI is refused before libnbd is
loaded or anything is connected. One spelling per export (the export's identity) is
``dmtools.identity.normalize_nbd_uri``.
"""

from __future__ import annotations

import os

from dmtools.errors import InvalidArgument
from dmtools.record import record

__all__ = ["DEFAULT_PORT", "SCHEMES", "NbdUri", "absolute_paths", "is_nbd_uri", "parse_uri", "relative_paths"]

#: The IANA port for NBD (doc/proto.md).
DEFAULT_PORT = 10809

#: Scheme → (transport, TLS required). vsock is libnbd's extension.
SCHEMES: dict[str, tuple[str, bool]] = {
    "nbd": ("tcp", False),
    "nbds": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
    "nbd+vsock": ("vsock", False),
    "nbds+vsock": ("vsock", True),
}


#: Query keys whose values are paths of this host (libnbd's nbd_connect_uri).
PATH_KEYS = ("socket", "tls-psk-file", "tls-certificates")


def is_nbd_uri(text: object) -> bool:
    """True when ``text`` is a string starting with an NBD scheme (``nbd://``, ``nbd+unix://`` …)."""
    if not isinstance(text, str):
        return False
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


@record(frozen=True)
class NbdUri:
    """A parsed NBD URI; ``text`` is what the user wrote (handed to libnbd unchanged)."""

    text: str
    scheme: str
    transport: str  # "tcp", "unix" or "vsock"
    tls: bool  # TLS required by the scheme
    host: str
    port: int
    export: str
    socket: str  # the Unix socket path ("" for TCP)
    user: str
    query: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        return self.text


def parse_uri(text: str) -> NbdUri:
    """Parse an NBD URI; raise ``InvalidArgument`` with a one-line reason when it is not one."""
    if not is_nbd_uri(text):
        raise InvalidArgument(f"not an NBD URI (nbd://, nbds://, nbd+unix://): {text!r}", operation="nbd")
    # Here, not at the top: every copy imports this module (is_nbd_uri), and urllib.parse with
    # the ipaddress module it imports costs about 2 ms of start-up.
    from urllib.parse import parse_qsl, unquote, urlsplit

    try:
        parts = urlsplit(text)
        port_text = parts.port  # raises ValueError on a bad port
    except ValueError as err:
        raise InvalidArgument(f"bad NBD URI: {err}", operation="nbd", device=text) from err
    scheme = parts.scheme.lower()
    transport, tls = SCHEMES[scheme]
    query = tuple(parse_qsl(parts.query, keep_blank_values=True))
    params = dict(query)
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    user = unquote(parts.username or "")
    host = parts.hostname or ""
    socket = ""
    if transport == "unix":
        socket = params.get("socket", "")
        if not socket:
            raise InvalidArgument("a Unix-socket NBD URI needs ?socket=PATH", operation="nbd", device=text)
        if host:
            raise InvalidArgument("a Unix-socket NBD URI has no host (nbd+unix:///EXPORT?socket=PATH)",
                                  operation="nbd", device=text)
        socket = os.path.abspath(socket)
    elif not host:
        raise InvalidArgument("a TCP NBD URI needs a host (nbd://HOST[:PORT]/EXPORT)", operation="nbd", device=text)
    port = port_text if port_text is not None else (DEFAULT_PORT if transport == "tcp" else 0)
    return NbdUri(text, scheme, transport, tls, host, port, export, socket, user, query)


def relative_paths(text: str) -> list[str]:
    """The relative paths an NBD URI names (its ``socket``, ``tls-psk-file``, ``tls-certificates``):
    libnbd resolves them in the working directory of the process that connects."""
    if not is_nbd_uri(text):
        return []
    from urllib.parse import parse_qsl, urlsplit

    return [v for k, v in parse_qsl(urlsplit(text).query, keep_blank_values=True)
            if k in PATH_KEYS and v and not v.startswith("/")]


def absolute_paths(text: str, cwd: str) -> str:
    """``text`` with each relative path of its query (:func:`relative_paths`) made absolute in
    ``cwd``; the URI unchanged when it has none (or is no NBD URI)."""
    if not relative_paths(text):
        return text
    from urllib.parse import parse_qsl, quote, urlencode, urlsplit

    parts = urlsplit(text)
    query = [(k, os.path.normpath(os.path.join(cwd, v)) if k in PATH_KEYS and v and not v.startswith("/") else v)
             for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    # by hand: urlunsplit drops the "//" of an empty authority (nbd+unix:///x would be nbd+unix:/x)
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(query, safe='/', quote_via=quote)}{fragment}"
