"""The TCP backend: listening, connecting, and the connection handshake.

The handshake carries the protocol's 8-byte private data exactly as RDMA CM does: the
source's CONNECT frame holds ``MAGIC`` and its request, the destination answers
ACCEPT with the granted flags or REJECT with the reason (an invalid version, say).
"""

from __future__ import annotations

import errno
import socket
from typing import ClassVar

from rdmamig import caps
from rdmamig.caps import Capability, PrivateData
from rdmamig.errors import RemoteProtocolError, TransportError
from rdmamig.transport import Backend, Listener

from .endpoint import TcpEndpoint
from .frames import FRAME, MAGIC, MAX_REASON, Kind, header, recv_exact, send_all

#: How long either side waits for the other's half of the handshake.
HANDSHAKE_TIMEOUT = 10.0


def _read_frame(sock: socket.socket, expected: set[Kind], limit: int) -> tuple[Kind, bytes]:
    head = memoryview(bytearray(FRAME.size))
    if not recv_exact(sock, head):
        raise ConnectionError("peer closed the connection during the handshake")
    kind, _flags, _rkey, _addr, _wr_id, length = FRAME.unpack(head)
    if kind not in expected:
        raise RemoteProtocolError(f"kind={kind} at offset 0: unexpected frame in the handshake")
    if length > limit:
        raise RemoteProtocolError(f"length={length} at offset 24: handshake frame too long")
    payload = bytearray(length)
    if length and not recv_exact(sock, memoryview(payload)):
        raise ConnectionError("peer closed the connection during the handshake")
    return Kind(kind), bytes(payload)


def _oserror(what: str, exc: OSError) -> TransportError:
    if isinstance(exc, TimeoutError):
        return TransportError(f"{what}: timed out", errno=errno.ETIMEDOUT)
    return TransportError(f"{what}: {exc.strerror or exc}", errno=exc.errno)


class TcpListener(Listener):
    """A listening TCP socket that hands out :class:`TcpEndpoint` connections."""

    def __init__(self, sock: socket.socket, *, supported: Capability) -> None:
        self._sock = sock
        self._supported = supported

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def accept(self, *, timeout: float | None) -> TcpEndpoint:
        self._sock.settimeout(timeout)
        try:
            conn, _peer = self._sock.accept()
        except OSError as exc:
            raise _oserror("accept", exc) from None
        conn.settimeout(HANDSHAKE_TIMEOUT)
        try:
            _kind, payload = _read_frame(conn, {Kind.CONNECT}, len(MAGIC) + 192)
            if not payload.startswith(MAGIC):
                raise RemoteProtocolError("magic at offset 28: not an rdmamig TCP peer")
            request = PrivateData.decode_untrusted(payload[len(MAGIC):])
            try:
                reply = caps.accept(request, supported=self._supported)
            except RemoteProtocolError as exc:
                reason = f"connection refused: {exc}".encode()
                send_all(conn, [header(Kind.REJECT, length=len(reason)), reason])
                raise
            granted = reply.encode()
            send_all(conn, [header(Kind.ACCEPT, length=len(granted)), granted])
        except BaseException as exc:
            conn.close()
            if isinstance(exc, OSError):
                raise _oserror("handshake with source", exc) from None
            raise
        return TcpEndpoint(conn, capabilities=Capability(reply.flags))

    def close(self) -> None:
        self._sock.close()


class TcpBackend(Backend):
    """RDMA's one-sided semantics over TCP sockets: runs anywhere, IPv4 and IPv6."""

    name: ClassVar[str] = "tcp"
    description: ClassVar[str] = "one-sided writes emulated over TCP sockets (any network)"
    supported: ClassVar[Capability] = caps.KNOWN_CAPABILITIES

    def unavailable_reason(self) -> str | None:
        return None

    def listen(self, *, host: str, port: int, supported: Capability) -> TcpListener:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, kind, proto, _name, address = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise _oserror(f"cannot listen on {host}:{port}", exc) from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(4)
        except OSError as exc:
            sock.close()
            raise _oserror(f"cannot listen on {host}:{port}", exc) from None
        return TcpListener(sock, supported=supported & self.supported)

    def connect(
        self, *, host: str, port: int, requested: Capability, timeout: float | None
    ) -> TcpEndpoint:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise _oserror(f"cannot connect to {host}:{port}", exc) from None
        try:
            sock.settimeout(timeout if timeout is not None else HANDSHAKE_TIMEOUT)
            hello = MAGIC + PrivateData(flags=int(requested)).encode()
            send_all(sock, [header(Kind.CONNECT, length=len(hello)), hello])
            kind, payload = _read_frame(sock, {Kind.ACCEPT, Kind.REJECT}, MAX_REASON)
            if kind == Kind.REJECT:
                reason = payload.decode("utf-8", "replace")
                raise TransportError(f"{host}:{port} refused the connection: {reason}",
                                     errno=errno.ECONNREFUSED)
            granted = caps.confirm(requested, PrivateData.decode_untrusted(payload))
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise _oserror(f"handshake with {host}:{port}", exc) from None
            raise
        return TcpEndpoint(sock, capabilities=granted)
