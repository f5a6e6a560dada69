"""Serving a device over NBD: nbdkit's ``file`` plugin on the device, started by socket activation.

``dmtools serve`` exports a mapped device of either backend (``/dev/mapper/NAME`` on the kernel,
``<run_dir>/mapper/NAME`` on the userspace engine). nbdkit does the protocol, TLS and several clients
with multi-conn; its ``file`` plugin flushes with ``fdatasync``, which reaches the device's targets
as a flush, so a flush acknowledged to any client covers every write acknowledged before it.

We open the listening socket ourselves and hand it to nbdkit as ``LISTEN_FDS``/``LISTEN_PID``
(systemd's socket activation, nbdkit-service(1)): a Unix socket is created with mode 0600 and never
replaces an existing file, a TCP port is bound before nbdkit starts (``:0`` picks a free one), and a
client that connects at once waits in the backlog instead of failing. We also keep the device open
for as long as we serve, so it cannot be removed under a client. nbdkit is named our descriptor
(``/proc/PID/fd/N``), but its ``file`` plugin resolves that link to a path once (``realpath``) and
opens the path for every connection: a device's node (``/dev/dm-N``, the userspace engine's
``/dev/loopN``, what ``dmtools serve`` serves) stays that device while we hold it open, whereas a
regular file renamed and replaced while served is the new file for the clients that connect after
(observed with nbdkit 1.32): serve files nobody else may rename.

Policy, as nbd-server and nbdkit users expect: read-only unless ``writable``; a TCP listener
requires TLS (a PSK file or a certificate directory) unless ``insecure`` is given.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
from dataclasses import dataclass
from urllib.parse import quote

from dmtools.errors import DMError, InvalidArgument

__all__ = ["ServeOptions", "Server", "parse_listen"]

#: socket activation passes the first descriptor as 3 (sd_listen_fds(3): SD_LISTEN_FDS_START).
_LISTEN_FD = 3
#: Signals that stop serving cleanly (nbdkit stopped, the socket removed), SIGHUP included: a
#: terminal closed under ``dmtools serve`` must not leave a socket that refuses the next serve.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every address) → ``(host, port)``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"--listen wants ADDR:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@dataclass(frozen=True)
class ServeOptions:
    """What to serve and how (see the module docstring for the rules)."""

    device: str  #: the block device (or file) to serve
    socket: str | None = None  #: a Unix socket path to create
    listen: tuple[str, int] | None = None  #: a TCP address
    export_name: str = ""
    writable: bool = False
    insecure: bool = False
    tls_psk: str | None = None
    tls_certificates: str | None = None
    threads: int = 16

    def check(self) -> None:
        """Refuse what cannot be served safely; nothing has been opened or bound yet."""
        if (self.socket is None) == (self.listen is None):
            raise InvalidArgument("give exactly one of --socket PATH and --listen ADDR:PORT")
        if self.tls_psk and self.tls_certificates:
            raise InvalidArgument("give one of --tls-psk and --tls-certificates, not both")
        tls = bool(self.tls_psk or self.tls_certificates)
        if self.listen is not None and not tls and not self.insecure:
            raise InvalidArgument("serving over TCP requires TLS (--tls-psk FILE or --tls-certificates DIR); "
                                  "--insecure serves in clear text")
        if self.tls_psk and not os.path.isfile(self.tls_psk):
            raise InvalidArgument(f"TLS PSK file {self.tls_psk} does not exist")
        if self.tls_certificates and not os.path.isdir(self.tls_certificates):
            raise InvalidArgument(f"TLS certificate directory {self.tls_certificates} does not exist")
        if self.socket is not None and os.path.lexists(self.socket):
            raise InvalidArgument(f"{self.socket} already exists; serve creates its socket itself")
        if not 1 <= self.threads <= 1024:
            raise InvalidArgument("threads must be between 1 and 1024")

    @property
    def tls(self) -> bool:
        """True when clients must use TLS."""
        return bool(self.tls_psk or self.tls_certificates)


class Server:
    """A running export: the device held open, the listening socket, and nbdkit serving them."""

    def __init__(self, options: ServeOptions) -> None:
        options.check()
        if shutil.which("nbdkit") is None:
            raise DMError("serving needs nbdkit (Debian: apt install nbdkit)")
        self.options = options
        flags = (os.O_RDWR if options.writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self._device_fd = os.open(options.device, flags)
        except OSError as err:
            raise DMError(f"cannot open {options.device}: {err.strerror}", errno=err.errno, operation="serve") from err
        self._sock: socket.socket | None = None
        self._address: str | tuple[str, int] | None = None
        self._socket_ino: tuple[int, int] | None = None
        try:
            mode = os.fstat(self._device_fd).st_mode
            if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
                raise InvalidArgument(f"{options.device} is not a block device or a file")
            self._sock = self._bind()
            self._address = self._sock.getsockname() if options.listen is not None else options.socket
            self.process = self._start()
        except BaseException:
            self._release()
            raise
        # nbdkit holds the only listening descriptor now: if it ends, waiting clients are refused.
        self._sock.close()
        self._sock = None

    # -- set-up ----------------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        opts = self.options
        if opts.socket is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                sock.bind(opts.socket)
            except OSError as err:
                sock.close()
                raise DMError(f"cannot create socket {opts.socket}: {err.strerror}", errno=err.errno,
                              operation="serve") from err
            finally:
                os.umask(old)
            st = os.lstat(opts.socket)
            self._socket_ino = (st.st_dev, st.st_ino)
        else:
            assert opts.listen is not None
            host, port = opts.listen
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as err:
                sock.close()
                raise DMError(f"cannot listen on {host}:{port}: {err.strerror}", errno=err.errno,
                              operation="serve") from err
        sock.listen(64)
        return sock

    def argv(self) -> list[str]:
        """nbdkit's command line (the socket arrives by activation, so no ``-U``/``-i``/``-p``)."""
        opts = self.options
        argv = ["nbdkit", "--exit-with-parent", "--threads", str(opts.threads)]
        if opts.export_name:
            argv += ["--exportname", opts.export_name]
        if not opts.writable:
            argv.append("--readonly")
        if opts.tls_psk:
            argv += ["--tls=require", f"--tls-psk={opts.tls_psk}"]
        elif opts.tls_certificates:
            argv += ["--tls=require", f"--tls-certificates={opts.tls_certificates}"]
        else:
            argv.append("--tls=off")
        argv += ["file", f"file=/proc/{os.getpid()}/fd/{self._device_fd}"]
        return argv

    def _start(self) -> subprocess.Popen[bytes]:
        assert self._sock is not None
        listen_fd = self._sock.fileno()

        def activate() -> None:  # in the child, before exec: the socket becomes descriptor 3
            os.dup2(listen_fd, _LISTEN_FD)
            os.environ["LISTEN_FDS"] = "1"
            os.environ["LISTEN_PID"] = str(os.getpid())

        return subprocess.Popen(self.argv(), pass_fds=(_LISTEN_FD,), preexec_fn=activate, stdin=subprocess.DEVNULL)

    # -- use -------------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int] | str:
        """The socket path, or the TCP ``(host, port)`` actually bound."""
        if isinstance(self._address, str):
            return self._address
        assert self._address is not None
        host, port = self._address[:2]
        return host, port

    @property
    def uri(self) -> str:
        """The URI clients connect to (``nbd+unix://``/``nbds+unix://`` or ``nbd://``/``nbds://``)."""
        export = quote(self.options.export_name, safe="")
        scheme = "nbds" if self.options.tls else "nbd"
        address = self.address
        if isinstance(address, str):
            return f"{scheme}+unix:///{export}?socket={quote(address, safe='/')}"
        host, port = address
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}/{export}"

    def wait(self) -> int:
        """Serve until nbdkit ends (or SIGINT, SIGTERM or SIGHUP, a closed terminal, ends it: each
        stops nbdkit, so ``stop`` then removes the socket); its exit status."""
        def forward(signum: int, _frame: object) -> None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)

        old = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
        try:
            return self.process.wait()
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def stop(self) -> None:
        """Stop nbdkit, close the device and remove the socket we created."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._release()

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._socket_ino is not None and self.options.socket is not None:
            with contextlib.suppress(OSError):  # only the socket we made, not a file put there since
                st = os.lstat(self.options.socket)
                if (st.st_dev, st.st_ino) == self._socket_ino:
                    os.unlink(self.options.socket)
            self._socket_ino = None
        if self._device_fd >= 0:
            os.close(self._device_fd)
            self._device_fd = -1

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
