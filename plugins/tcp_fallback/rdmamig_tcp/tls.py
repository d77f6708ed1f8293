"""TLS for the TCP backend (Python's ``ssl``): each lane is a TLS connection.

A lane is used by two threads at once, its sender and its receiver, and an
OpenSSL connection may not be: so the TLS state is an ``ssl.SSLObject`` over
memory BIOs, used under a lock, and the socket is read and written outside it.
:class:`TlsSocket` offers the few socket calls the framing makes (``sendmsg``,
``recv_into``, ``shutdown``, ...), so that lanes, the handshake and the deadlines
work on it unchanged.

The listener presents a certificate; a source checks it against ``--tls-ca`` (or
the system's CAs) and the host name it connects to. With ``--tls-ca`` on the
listener, sources must present a certificate that CA signed (mutual TLS).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import attrs
from rdmamig.errors import ConfigurationError

from .frames import FRAME_TIMEOUT, send_all

#: Bytes read from the socket at a time.
_READ = 256 << 10


@attrs.frozen(kw_only=True)
class TlsOptions:
    """Files of a TLS configuration (PEM).

    Attributes:
        certificate: this side's certificate chain (required on a listener).
        key: its private key (default: in ``certificate``).
        ca: the CA to check the peer's certificate against; on a listener it makes
            client certificates required.
    """

    certificate: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    def _load(self, context: ssl.SSLContext) -> ssl.SSLContext:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if self.certificate is not None:
                context.load_cert_chain(self.certificate, self.key)
            if self.ca is not None:
                context.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"TLS: cannot load {self._files()}: {exc}") from None
        return context

    def _files(self) -> str:
        return ", ".join(str(f) for f in (self.certificate, self.key, self.ca) if f) or "-"

    def server_context(self) -> ssl.SSLContext:
        """The listener's context.

        Raises:
            ConfigurationError: no certificate, or a file that does not load.
        """
        if self.certificate is None:
            raise ConfigurationError("TLS on a listener needs --tls-cert (and --tls-key)")
        context = self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        context.num_tickets = 0  # no post-handshake messages: nothing to resume
        if self.ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """A source's context: the listener's certificate is checked (against
        ``ca``, else the system's CAs) with its host name."""
        context = self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        if self.ca is None:
            context.load_default_certs()
        return context


class TlsSocket:
    """A TLS connection over the connected ``sock``, for one sending and one
    receiving thread at a time. Make it with :func:`wrap`."""

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self._sock, self._obj = sock, obj
        self._incoming, self._outgoing = incoming, outgoing
        self._state = threading.Lock()  # the SSLObject and its BIOs
        self._sending = threading.Lock()  # the socket's sending side, in record order
        self._eof = False
        # Only the receiving thread reads into it: one buffer, no allocation per read.
        self._scratch = bytearray(_READ)
        self._scratch_view = memoryview(self._scratch)

    # ------------------------------------------------------------ what lanes call

    def sendmsg(self, buffers: Sequence[bytes | memoryview], ancdata: Sequence[Any] = (),
                flags: int = 0) -> int:
        """Encrypt and send every buffer (all of them: the count is their total);
        ``ancdata`` and ``flags`` (MSG_MORE) are a socket's, and not needed here."""
        total = 0
        with self._sending:
            for buffer in buffers:
                with self._state:
                    total += self._obj.write(buffer)
                    records = self._outgoing.read()
                try:
                    send_all(self._sock, [records], timeout=FRAME_TIMEOUT)
                except (BrokenPipeError, ConnectionResetError):
                    self._raise_alert()
                    raise
        return total

    def _raise_alert(self) -> None:
        """Raise the TLS alert the peer sent before it closed, if it sent one (a
        listener refusing our certificate does, right after the handshake)."""
        with contextlib.suppress(OSError):
            while raw := self._sock.recv(_READ, socket.MSG_DONTWAIT):
                self._incoming.write(raw)
        with self._state, contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError,
                                              ssl.SSLEOFError):
            self._obj.read(1)

    def recv_into(self, into: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        """Decrypt up to ``nbytes`` into ``into`` (at least one byte, 0 at the end
        of the connection). A wake-up of the socket without data raises
        BlockingIOError, as a plain socket's would."""
        size = min(nbytes or len(into), len(into))
        while True:
            with self._state:
                try:  # with a buffer, read() returns the count (typeshed says bytes)
                    return cast(int, self._obj.read(size, into))
                except ssl.SSLWantReadError:
                    if self._eof:
                        return 0
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return 0
            count = self._sock.recv_into(self._scratch)
            with self._state:
                if count:
                    self._incoming.write(self._scratch_view[:count])
                else:
                    self._incoming.write_eof()
                    self._eof = True

    # ------------------------------------------------------------ the socket's own

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def getsockname(self) -> Any:
        return self._sock.getsockname()


def wrap(sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
         server_hostname: str | None = None, timeout: float) -> TlsSocket:
    """Run the TLS handshake on ``sock`` within ``timeout`` seconds.

    Raises:
        ssl.SSLError: the handshake failed (a certificate that does not check).
        TimeoutError, ConnectionError: the peer was too slow or went away.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_side=server_side,
                           server_hostname=server_hostname)
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                if outgoing.pending:  # the alert that tells the peer why
                    with contextlib.suppress(OSError):
                        sock.sendall(outgoing.read())
                raise
            if outgoing.pending:
                sock.sendall(outgoing.read())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"TLS handshake not done within {timeout} s")
            sock.settimeout(remaining)
            raw = sock.recv(_READ)
            if not raw:
                raise ConnectionError("peer closed the connection during the TLS handshake")
            incoming.write(raw)
        if outgoing.pending:
            sock.sendall(outgoing.read())
    finally:
        sock.settimeout(previous)
    return TlsSocket(sock, obj, incoming, outgoing)
