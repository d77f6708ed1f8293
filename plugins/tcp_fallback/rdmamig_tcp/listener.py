"""The TCP backend: listening, connecting, and the connection handshake.

The handshake carries the protocol's 8-byte private data exactly as RDMA CM does: the
source's CONNECT frame holds ``MAGIC`` and its request, the destination answers
ACCEPT with the granted flags or REJECT with the reason (an invalid version, say).
A source that wants more than one lane (``channels``) names the count in CONNECT;
ACCEPT carries a random join token, and each further lane is a new connection that
opens with JOIN (token, lane number) and is answered ACCEPT.
"""

from __future__ import annotations

import contextlib
import errno
import secrets
import socket
import time
from collections.abc import Sequence
from typing import ClassVar

import attrs
from rdmamig import caps
from rdmamig.caps import Capability, PrivateData
from rdmamig.errors import RemoteProtocolError, TransportError
from rdmamig.transport import Backend, Listener

from .endpoint import TcpEndpoint
from .frames import FRAME, MAGIC, MAX_LANES, MAX_REASON, Kind, header, recv_exact, send_all

#: How long either side waits for the other's half of the handshake.
HANDSHAKE_TIMEOUT = 10.0


@attrs.frozen
class _Handshake:
    """One handshake frame: its kind, the two header fields it uses, its payload."""

    kind: Kind
    lanes: int  # the header's rkey field
    token: int  # the header's wr_id field
    payload: bytes


def _read_frame(sock: socket.socket, expected: set[Kind], limit: int) -> _Handshake:
    head = memoryview(bytearray(FRAME.size))
    if not recv_exact(sock, head):
        raise ConnectionError("peer closed the connection during the handshake")
    kind, _flags, rkey, _addr, wr_id, length = FRAME.unpack(head)
    if kind not in expected:
        raise RemoteProtocolError(f"kind={kind} at offset 0: unexpected frame in the handshake")
    if length > limit:
        raise RemoteProtocolError(f"length={length} at offset 24: handshake frame too long")
    payload = bytearray(length)
    if length and not recv_exact(sock, memoryview(payload)):
        raise ConnectionError("peer closed the connection during the handshake")
    return _Handshake(Kind(kind), rkey, wr_id, bytes(payload))


def _reject(sock: socket.socket, reason: str) -> None:
    encoded = reason.encode()[:MAX_REASON]
    send_all(sock, [header(Kind.REJECT, length=len(encoded)), encoded])


def _close_all(socks: Sequence[socket.socket]) -> None:
    for sock in socks:
        sock.close()


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
        conn = self._accept_socket(timeout, "accept")
        socks = [conn]
        try:
            hello = _read_frame(conn, {Kind.CONNECT}, len(MAGIC) + 192)
            if not hello.payload.startswith(MAGIC):
                raise RemoteProtocolError("magic at offset 28: not an rdmamig TCP peer")
            request = PrivateData.decode_untrusted(hello.payload[len(MAGIC):])
            lanes = hello.lanes or 1
            try:
                if lanes > MAX_LANES:
                    raise RemoteProtocolError(f"lanes={lanes} at offset 4: more than "
                                              f"{MAX_LANES} lanes asked for")
                reply = caps.accept(request, supported=self._supported)
            except RemoteProtocolError as exc:
                _reject(conn, f"connection refused: {exc}")
                raise
            token = secrets.randbits(63)
            granted = reply.encode()
            send_all(conn, [header(Kind.ACCEPT, length=len(granted), rkey=lanes,
                                   wr_id=token), granted])
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            while len(socks) < lanes:
                socks += self._join(token, len(socks), deadline)
        except BaseException as exc:
            _close_all(socks)
            if isinstance(exc, OSError):
                raise _oserror("handshake with source", exc) from None
            raise
        return TcpEndpoint(socks, capabilities=Capability(reply.flags))

    def _accept_socket(self, timeout: float | None, what: str) -> socket.socket:
        self._sock.settimeout(timeout)
        try:
            conn, _peer = self._sock.accept()
        except OSError as exc:
            raise _oserror(what, exc) from None
        conn.settimeout(HANDSHAKE_TIMEOUT)
        return conn

    def _join(self, token: int, lane: int, deadline: float) -> list[socket.socket]:
        """Accept the connection that opens lane ``lane``: [it], or [] when it was a
        stranger's (refused, and the source's lanes may still come)."""
        conn = self._accept_socket(max(deadline - time.monotonic(), 0.001),
                                   f"waiting for lane {lane} of the source")
        try:
            join = _read_frame(conn, {Kind.JOIN}, 0)
        except (RemoteProtocolError, ConnectionError, OSError):
            join = None
        try:
            if join is None or join.token != token:
                with contextlib.suppress(OSError):
                    _reject(conn, "busy: another source is connecting")
                conn.close()
                return []
            if join.lanes != lane:
                raise RemoteProtocolError(f"lane={join.lanes} at offset 4: expected lane "
                                          f"{lane} to join next")
            send_all(conn, [header(Kind.ACCEPT)])
        except BaseException:
            conn.close()
            raise
        return [conn]

    def close(self) -> None:
        self._sock.close()


class TcpBackend(Backend):
    """RDMA's one-sided semantics over TCP sockets: runs anywhere, IPv4 and IPv6."""

    name: ClassVar[str] = "tcp"
    description: ClassVar[str] = "one-sided writes emulated over TCP sockets (any network)"
    supported: ClassVar[Capability] = caps.KNOWN_CAPABILITIES
    max_channels: ClassVar[int] = MAX_LANES

    def __init__(self, *, channels: int = 1) -> None:
        """``channels``: TCP connections a source stripes its writes over (QEMU's
        multifd channels), 1 to 16. A listener takes whatever its source asks for."""
        if not 1 <= channels <= MAX_LANES:
            raise ValueError(f"channels={channels}: must be 1 to {MAX_LANES}")
        self.channels = channels

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
            sock.listen(MAX_LANES)
        except OSError as exc:
            sock.close()
            raise _oserror(f"cannot listen on {host}:{port}", exc) from None
        return TcpListener(sock, supported=supported & self.supported)

    def connect(
        self, *, host: str, port: int, requested: Capability, timeout: float | None
    ) -> TcpEndpoint:
        socks: list[socket.socket] = []
        try:
            socks.append(self._open(host, port, timeout))
            hello = MAGIC + PrivateData(flags=int(requested)).encode()
            send_all(socks[0], [header(Kind.CONNECT, length=len(hello), rkey=self.channels),
                                hello])
            reply = self._answer(socks[0], host, port)
            granted = caps.confirm(requested, PrivateData.decode_untrusted(reply.payload))
            if reply.lanes != self.channels:
                raise RemoteProtocolError(f"lanes={reply.lanes} at offset 4: asked for "
                                          f"{self.channels} lanes")
            for lane in range(1, self.channels):
                socks.append(self._open(host, port, timeout))
                send_all(socks[lane], [header(Kind.JOIN, rkey=lane, wr_id=reply.token)])
                self._answer(socks[lane], host, port)
        except BaseException as exc:
            _close_all(socks)
            if isinstance(exc, OSError):
                raise _oserror(f"handshake with {host}:{port}", exc) from None
            raise
        return TcpEndpoint(socks, capabilities=granted)

    @staticmethod
    def _open(host: str, port: int, timeout: float | None) -> socket.socket:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise _oserror(f"cannot connect to {host}:{port}", exc) from None
        sock.settimeout(timeout if timeout is not None else HANDSHAKE_TIMEOUT)
        return sock

    @staticmethod
    def _answer(sock: socket.socket, host: str, port: int) -> _Handshake:
        """The destination's ACCEPT (raised as an error when it is a REJECT)."""
        answer = _read_frame(sock, {Kind.ACCEPT, Kind.REJECT}, MAX_REASON)
        if answer.kind == Kind.REJECT:
            reason = answer.payload.decode("utf-8", "replace")
            raise TransportError(f"{host}:{port} refused the connection: {reason}",
                                 errno=errno.ECONNREFUSED)
        return answer
