"""The TCP backend: listening, connecting, and the connection handshake.

The handshake carries the protocol's 8-byte private data exactly as RDMA CM does: the
source's CONNECT frame holds ``MAGIC`` and its request, the destination answers
ACCEPT with the granted flags or REJECT with the reason (an invalid version, say).
A source that wants more than one lane (``channels``) names the count in CONNECT;
ACCEPT carries a random join token, and each further lane is a new connection that
opens with JOIN (token, lane number) and is answered ACCEPT.

The listener is a network service: a thread accepts connections and each one's
handshake runs on a thread of its own, held to :data:`HANDSHAKE_TIMEOUT` from its
first byte to its last, so that no stranger (a port scanner, a peer that drips one
byte a second, garbage) delays or ends another connection. A connection that fails
its handshake is refused with the reason and logged; :meth:`TcpListener.accept`
only hands out sources whose every lane has joined.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import secrets
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeGuard, cast

import attrs
from rdmamig import caps
from rdmamig.caps import Capability, PrivateData
from rdmamig.errors import RemoteProtocolError, TransportError
from rdmamig.transport import Backend, Listener, address_text

from .endpoint import TcpEndpoint
from .frames import (
    FRAME,
    MAGIC,
    MAX_LANES,
    MAX_REASON,
    Kind,
    header,
    recv_exact,
    send_all,
    set_wakeups,
)

if TYPE_CHECKING:
    import ssl

    from .tls import TlsOptions

log = logging.getLogger("rdmamig.tcp")

#: Seconds a connection has for its whole handshake (all lanes of a source included).
HANDSHAKE_TIMEOUT = 10.0
#: Handshakes in progress at once; a connection beyond them is closed at once.
MAX_HANDSHAKES = 64
#: Connections the kernel holds until the acceptor thread takes them.
BACKLOG = 128
#: Sources whose handshake is done and that were not taken by accept() yet.
MAX_WAITING = 16


@attrs.frozen
class _Handshake:
    """One handshake frame: its kind, the two header fields it uses, its payload."""

    kind: Kind
    lanes: int  # the header's rkey field
    token: int  # the header's wr_id field
    payload: bytes


def _read_frame(sock: socket.socket, expected: set[Kind], limit: int,
                timeout: float) -> _Handshake:
    head = memoryview(bytearray(FRAME.size))
    if not recv_exact(sock, head, timeout=timeout):
        raise ConnectionError("peer closed the connection during the handshake")
    kind, _flags, rkey, _addr, wr_id, length = FRAME.unpack(head)
    if kind not in expected:
        raise RemoteProtocolError(f"kind={kind} at offset 0: unexpected frame in the handshake")
    if length > limit:
        raise RemoteProtocolError(f"length={length} at offset 24: handshake frame too long")
    payload = bytearray(length)
    if length and not recv_exact(sock, memoryview(payload), timeout=timeout):
        raise ConnectionError("peer closed the connection during the handshake")
    return _Handshake(Kind(kind), rkey, wr_id, bytes(payload))


def _reject(sock: socket.socket, reason: str) -> None:
    encoded = reason.encode()[:MAX_REASON]
    with contextlib.suppress(OSError):
        send_all(sock, [header(Kind.REJECT, length=len(encoded)), encoded],
                 timeout=HANDSHAKE_TIMEOUT)


def _close_all(socks: Sequence[socket.socket | None]) -> None:
    for sock in socks:
        if sock is not None:
            sock.close()


def _tls_error(exc: BaseException) -> TypeGuard[ssl.SSLError]:
    """Whether ``exc`` is a TLS failure (``ssl`` is loaded only when TLS is used:
    without it, nothing could have raised one)."""
    loaded = sys.modules.get("ssl")
    return loaded is not None and isinstance(exc, loaded.SSLError)


def _oserror(what: str, exc: OSError) -> TransportError:
    if isinstance(exc, TimeoutError):
        return TransportError(f"{what}: timed out", errno=errno.ETIMEDOUT)
    return TransportError(f"{what}: {exc.strerror or exc}", errno=exc.errno)


def _name(peer: object) -> str:
    """A peer's address as people write it (IPv6 in brackets)."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return address_text(str(peer[0]), int(peer[1]))
    return str(peer)


@attrs.define
class _Joining:
    """A source whose CONNECT was accepted, while its other lanes join."""

    socks: list[socket.socket | None]
    peer: str
    capabilities: Capability
    done: threading.Event = attrs.Factory(threading.Event)


class TcpListener(Listener):
    """A listening TCP socket that hands out :class:`TcpEndpoint` connections."""

    def __init__(self, sock: socket.socket, *, supported: Capability,
                 required: Capability = Capability(0),
                 tls: ssl.SSLContext | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self._sock = sock
        self._handshake_timeout = handshake_timeout
        self._tls = tls
        self._supported = supported
        self._required = required
        self._ready: queue.Queue[TcpEndpoint] = queue.Queue(MAX_WAITING)
        self._joining: dict[int, _Joining] = {}
        self._lock = threading.Lock()
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="rdmamig-tcp-accept")
        self._acceptor.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def accept(self, *, timeout: float | None) -> TcpEndpoint:
        try:
            return self._ready.get(timeout=timeout)
        except queue.Empty:
            raise TransportError(f"accept: no source connected within {timeout} s",
                                 errno=errno.ETIMEDOUT) from None

    # ------------------------------------------------------------ the service

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.1)  # EMFILE and the like: let the others finish
                continue
            if not self._handshakes.acquire(blocking=False):
                log.warning("refused %s: %d handshakes already in progress", _name(peer),
                            MAX_HANDSHAKES)
                conn.close()
                continue
            threading.Thread(target=self._handshake, args=(conn, _name(peer)), daemon=True,
                             name="rdmamig-tcp-handshake").start()

    def _handshake(self, conn: socket.socket, peer: str) -> None:
        """Serve one connection's first frame: CONNECT opens a source, JOIN adds a
        lane to one. Anything else, or a failure, closes the connection."""
        keep = False
        try:
            if self._tls is not None:
                from .tls import wrap
                # A TLS socket stands in for the socket (tls.TlsSocket says how).
                conn = cast(socket.socket, wrap(conn, self._tls, server_side=True,
                                                timeout=self._handshake_timeout))
            conn.settimeout(None)
            set_wakeups(conn)
            first = _read_frame(conn, {Kind.CONNECT, Kind.JOIN}, len(MAGIC) + 192,
                                self._handshake_timeout)
            if first.kind == Kind.CONNECT:
                self._open(conn, first, peer)
            else:
                self._join(conn, first, peer)
            keep = True
        except RemoteProtocolError as exc:
            log.warning("refused %s: %s", peer, exc)
            _reject(conn, f"connection refused: {exc}")
        except (OSError, ConnectionError) as exc:
            if _tls_error(exc):
                log.warning("refused %s: TLS: %s", peer, exc.reason or exc)
            else:
                log.warning("dropped %s during the handshake: %s", peer,
                            "timed out" if isinstance(exc, TimeoutError) else exc)
        finally:
            if not keep:
                conn.close()
            self._handshakes.release()

    def _open(self, conn: socket.socket, hello: _Handshake, peer: str) -> None:
        if not hello.payload.startswith(MAGIC):
            if hello.payload[:len(MAGIC)][:-1] == MAGIC[:-1]:
                raise RemoteProtocolError(
                    f"magic at offset 28: rdmamig TCP framing version "
                    f"{hello.payload[len(MAGIC) - 1]}, this end speaks {MAGIC[-1]}")
            raise RemoteProtocolError("magic at offset 28: not an rdmamig TCP peer")
        request = PrivateData.decode_untrusted(hello.payload[len(MAGIC):])
        lanes = hello.lanes or 1
        if lanes > MAX_LANES:
            raise RemoteProtocolError(f"lanes={lanes} at offset 4: more than {MAX_LANES} "
                                      f"lanes asked for")
        reply = caps.accept(request, supported=self._supported, required=self._required)
        token = secrets.randbits(63)
        joining = _Joining([conn, *[None] * (lanes - 1)], peer, Capability(reply.flags))
        if lanes > 1:
            with self._lock:
                self._joining[token] = joining
        granted = reply.encode()
        send_all(conn, [header(Kind.ACCEPT, length=len(granted), rkey=lanes, wr_id=token),
                        granted], timeout=self._handshake_timeout)
        if lanes > 1 and not joining.done.wait(self._handshake_timeout):
            with self._lock:
                self._joining.pop(token, None)
            joined = sum(sock is not None for sock in joining.socks)
            _close_all(joining.socks[1:])
            raise TimeoutError(f"{joined} of its {lanes} lanes joined")
        if self._closed.is_set():  # close() woke us: nobody takes the source now
            _close_all(joining.socks[1:])
            raise ConnectionError("the listener closed")
        self._hand_out(joining)

    def _join(self, conn: socket.socket, join: _Handshake, peer: str) -> None:
        with self._lock:
            joining = self._joining.get(join.token)
            if joining is None:
                raise RemoteProtocolError("wr_id at offset 16: unknown join token")
            if not 0 < join.lanes < len(joining.socks) or joining.socks[join.lanes]:
                raise RemoteProtocolError(f"lane={join.lanes} at offset 4: not a lane "
                                          f"still to join")
            send_all(conn, [header(Kind.ACCEPT)], timeout=self._handshake_timeout)
            joining.socks[join.lanes] = conn
            if all(joining.socks):
                del self._joining[join.token]
                joining.done.set()

    def _hand_out(self, joining: _Joining) -> None:
        socks = [sock for sock in joining.socks if sock is not None]
        endpoint = TcpEndpoint(socks, capabilities=joining.capabilities)
        try:
            self._ready.put_nowait(endpoint)
        except queue.Full:
            endpoint.close()
            raise TimeoutError(f"{MAX_WAITING} sources already wait to be served") from None
        log.info("accepted %s (%d lane%s)", joining.peer, len(socks),
                 "" if len(socks) == 1 else "s")

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._acceptor.join(timeout=5)
        with self._lock:
            pending, self._joining = list(self._joining.values()), {}
        for joining in pending:
            joining.done.set()
        while True:
            try:
                self._ready.get_nowait().close()
            except queue.Empty:
                break


class TcpBackend(Backend):
    """RDMA's one-sided semantics over TCP sockets: runs anywhere, IPv4 and IPv6."""

    name: ClassVar[str] = "tcp"
    description: ClassVar[str] = "one-sided writes emulated over TCP sockets (any network)"
    supported: ClassVar[Capability] = caps.KNOWN_CAPABILITIES
    max_channels: ClassVar[int] = MAX_LANES

    def __init__(self, *, channels: int = 1, tls: bool = False, tls_cert: Path | None = None,
                 tls_key: Path | None = None, tls_ca: Path | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """``channels``: TCP connections a source stripes its writes over (QEMU's
        multifd channels), 1 to 16. A listener takes whatever its source asks for.

        ``tls`` (or any of the files) runs every connection over TLS
        (:mod:`rdmamig_tcp.tls`): a listener presents ``tls_cert`` / ``tls_key``
        and with ``tls_ca`` requires client certificates; a source checks the
        listener against ``tls_ca`` (default: the system's CAs) and may present
        its own.

        ``handshake_timeout``: seconds a listener gives a connection, from its first
        byte to its last lane joined (OpenSSH's LoginGraceTime)."""
        if not 1 <= channels <= MAX_LANES:
            raise ValueError(f"channels={channels}: must be 1 to {MAX_LANES}")
        if not 0 < handshake_timeout <= 3600:
            raise ValueError(f"handshake_timeout={handshake_timeout}: must be over 0 and at "
                             f"most 3600 s")
        self.channels = channels
        self.handshake_timeout = handshake_timeout
        self.tls: TlsOptions | None = None
        if tls or tls_cert or tls_key or tls_ca:
            # Loaded only here: ``ssl`` takes a while to import, and most runs go without.
            from .tls import TlsOptions
            self.tls = TlsOptions(certificate=tls_cert, key=tls_key, ca=tls_ca)

    def unavailable_reason(self) -> str | None:
        return None

    def listen(self, *, host: str, port: int, supported: Capability,
               required: Capability = Capability(0)) -> TcpListener:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, kind, proto, _name, address = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise _oserror(f"cannot listen on {address_text(host, port)}", exc) from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise _oserror(f"cannot listen on {address_text(host, port)}", exc) from None
        try:
            context = self.tls.server_context() if self.tls is not None else None
        except BaseException:
            sock.close()
            raise
        return TcpListener(sock, supported=supported & self.supported, required=required,
                           tls=context, handshake_timeout=self.handshake_timeout)

    def connect(
        self, *, host: str, port: int, requested: Capability, timeout: float | None
    ) -> TcpEndpoint:
        socks: list[socket.socket] = []
        context = self.tls.client_context() if self.tls is not None else None
        try:
            socks.append(self._open(host, port, timeout, context))
            hello = MAGIC + PrivateData(flags=int(requested)).encode()
            send_all(socks[0], [header(Kind.CONNECT, length=len(hello), rkey=self.channels),
                                hello])
            reply = self._answer(socks[0], host, port)
            granted = caps.confirm(requested, PrivateData.decode_untrusted(reply.payload))
            if reply.lanes != self.channels:
                raise RemoteProtocolError(f"lanes={reply.lanes} at offset 4: asked for "
                                          f"{self.channels} lanes")
            for lane in range(1, self.channels):
                socks.append(self._open(host, port, timeout, context))
                send_all(socks[lane], [header(Kind.JOIN, rkey=lane, wr_id=reply.token)])
                self._answer(socks[lane], host, port)
        except BaseException as exc:
            _close_all(socks)
            if _tls_error(exc):
                raise TransportError(f"TLS with {address_text(host, port)}: {exc.reason or exc}",
                                     errno=errno.EPROTO) from None
            if isinstance(exc, OSError):
                raise _oserror(f"handshake with {address_text(host, port)}", exc) from None
            raise
        return TcpEndpoint(socks, capabilities=granted)

    @staticmethod
    def _open(host: str, port: int, timeout: float | None,
              tls: ssl.SSLContext | None) -> socket.socket:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise _oserror(f"cannot connect to {address_text(host, port)}", exc) from None
        sock.settimeout(timeout if timeout is not None else HANDSHAKE_TIMEOUT)
        if tls is None:
            return sock
        from .tls import wrap
        try:
            # A TLS socket stands in for the socket (tls.TlsSocket says how).
            return cast(socket.socket, wrap(sock, tls, server_side=False, server_hostname=host,
                                            timeout=timeout or HANDSHAKE_TIMEOUT))
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _answer(sock: socket.socket, host: str, port: int) -> _Handshake:
        """The destination's ACCEPT (raised as an error when it is a REJECT)."""
        answer = _read_frame(sock, {Kind.ACCEPT, Kind.REJECT}, MAX_REASON,
                             sock.gettimeout() or HANDSHAKE_TIMEOUT)
        if answer.kind == Kind.REJECT:
            # The peer's words, escaped: a reason cannot drive the terminal.
            reason = answer.payload.decode("utf-8", "replace").encode("unicode_escape"
                                                                       ).decode()
            raise TransportError(f"{address_text(host, port)} refused the connection: {reason}",
                                 errno=errno.ECONNREFUSED)
        return answer
