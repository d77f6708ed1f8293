"""One TCP connection with RDMA semantics: control SEND / RECV, registration that
really pins (mlock), and one-sided writes placed by a receiver thread.

The receiver thread plays the part of the NIC: it reads every frame, places WRITE
payloads straight into registered memory with ``recv_into`` (no copy in Python),
acknowledges signaled writes, and queues control messages for
:meth:`TcpEndpoint.recv_message`. A write with a key that was never granted, was
deregistered, or reaches outside its region is a remote access error: nothing is
written, the writer gets a NAK with the reason and both ends go to the error state,
as an RC queue pair does.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Container, Sequence

from rdmamig import pinning, wire
from rdmamig.caps import Capability
from rdmamig.errors import LocalProtocolError, RemoteProtocolError, TransportError
from rdmamig.regions import RegionTable
from rdmamig.transport import Endpoint, MemoryRegion, RemoteWrite

from .frames import FRAME, MAX_REASON, SIGNALED, Kind, header, recv_exact, send_all


class _RemoteAccessError(Exception):
    """A peer's write that must not be placed."""


class TcpEndpoint(Endpoint):
    """A connected TCP endpoint. Made by :class:`~rdmamig_tcp.TcpBackend`."""

    def __init__(self, sock: socket.socket, *, capabilities: Capability) -> None:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.capabilities = capabilities
        self._sock = sock
        self._send_lock = threading.Lock()
        # Guards the key tables; held while a write is placed, so that a deregister
        # waits for it, as ibv_dereg_mr waits for the NIC.
        self._keys = threading.Lock()
        # Guards the inbox, the completions and the error state.
        self._cond = threading.Condition()
        self._regions: RegionTable[memoryview] = RegionTable()
        # Remotely writable regions by rkey: what the peer's writes are checked against.
        self._by_rkey: dict[int, tuple[MemoryRegion, memoryview]] = {}
        self._inbox: deque[bytes] = deque()
        self._tickets = itertools.count(1)
        self._completed = 0
        self._error: TransportError | None = None
        self._closed = False
        self._reader = threading.Thread(target=self._receive_loop, name="rdmamig-tcp-rx",
                                        daemon=True)
        self._reader.start()

    # ------------------------------------------------------------ control channel

    def send_message(self, *, data: bytes) -> None:
        if len(data) > wire.MAX_MESSAGE:
            raise LocalProtocolError(f"control message of {len(data)} bytes is over 512 KiB")
        self._send([header(Kind.SEND, length=len(data)), data])

    def recv_message(self, *, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._inbox:
                if self._error is not None:
                    raise self._error
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransportError(f"no control message within {timeout} s",
                                         errno=errno.ETIMEDOUT)
                self._cond.wait(remaining)
            return self._inbox.popleft()

    # ------------------------------------------------------------ registration

    def register(self, *, buffer: memoryview, remote_write: bool) -> MemoryRegion:
        view = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
        address = pinning.buffer_address(view)
        pinning.mlock(address, view.nbytes)
        with self._keys:
            lkey = self._new_key(self._regions)
            rkey = self._new_key(self._by_rkey) if remote_write else 0
            region = MemoryRegion(addr=address, length=view.nbytes, lkey=lkey, rkey=rkey)
            self._regions.add(region, view)
            if rkey:
                self._by_rkey[rkey] = (region, view)
        return region

    @staticmethod
    def _new_key(table: Container[int]) -> int:
        # Random and unguessable, like an rkey should be; never 0 ("no key").
        while True:
            key = secrets.randbits(32)
            if key and key not in table:
                return key

    def deregister(self, *, region: MemoryRegion) -> None:
        with self._keys:
            self._regions.remove(region)
            self._unpin(region)

    def _unpin(self, region: MemoryRegion) -> None:
        self._by_rkey.pop(region.rkey, None)
        pinning.munlock(region.addr, region.length)

    @property
    def pinned_bytes(self) -> int:
        return self._regions.pinned

    @property
    def pinned_peak_bytes(self) -> int:
        return self._regions.pinned_peak

    # ------------------------------------------------------------ one-sided writes

    def post_writes(self, *, writes: Sequence[RemoteWrite]) -> int:
        if not writes:
            raise LocalProtocolError("post_writes needs at least one write")
        ticket = next(self._tickets)
        buffers: list[bytes | memoryview] = []
        with self._keys:
            for position, write in enumerate(writes):
                _region, view = self._regions.source_of(write)
                last = position == len(writes) - 1
                buffers.append(header(
                    Kind.WRITE, length=write.length, rkey=write.rkey,
                    remote_addr=write.remote_addr, wr_id=ticket if last else 0,
                    flags=SIGNALED if last else 0))
                buffers.append(view[write.offset:write.offset + write.length])
        self._send(buffers)
        return ticket

    def wait_writes(self, *, ticket: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._completed < ticket:
                if self._error is not None:
                    raise self._error
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransportError(f"writes of batch {ticket} not completed within "
                                         f"{timeout} s", errno=errno.ETIMEDOUT)
                self._cond.wait(remaining)

    # ------------------------------------------------------------ plumbing

    def _send(self, buffers: Sequence[bytes | memoryview]) -> None:
        if self._error is not None:
            raise self._error
        try:
            with self._send_lock:
                send_all(self._sock, buffers)
        except OSError as exc:
            # The receiver thread usually knows why (a NAK with the reason, EOF):
            # give it a moment to say so before falling back to the bare errno.
            with self._cond:
                self._cond.wait_for(lambda: self._error is not None, timeout=2.0)
            self._fail(TransportError(f"send failed: {exc.strerror or exc}", errno=exc.errno))
            assert self._error is not None
            raise self._error from None

    def _fail(self, error: TransportError) -> None:
        """Enter the error state (first error wins) and wake every waiter."""
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    def _receive_loop(self) -> None:
        head = memoryview(bytearray(FRAME.size))
        try:
            while recv_exact(self._sock, head):
                kind, flags, rkey, addr, wr_id, length = FRAME.unpack(head)
                if kind == Kind.WRITE:
                    self._place_write(rkey, addr, length)
                    if flags & SIGNALED:
                        self._send([header(Kind.ACK, wr_id=wr_id)])
                elif kind == Kind.SEND:
                    self._take_message(length)
                elif kind == Kind.ACK:
                    with self._cond:
                        self._completed = max(self._completed, wr_id)
                        self._cond.notify_all()
                elif kind == Kind.NAK:
                    reason = self._read_reason(length)
                    self._fail(TransportError(f"remote access error: {reason}",
                                              errno=errno.EACCES))
                    return
                else:
                    raise RemoteProtocolError(f"kind={kind} at offset 0: unknown TCP frame")
            self._fail(TransportError("peer closed the connection", errno=errno.ECONNRESET))
        except _RemoteAccessError as exc:
            # Like an RC responder: place nothing, tell the writer why, and stop the
            # queue pair. Half-close and drain, so the NAK is read before any reset.
            reason = str(exc)
            self._fail(TransportError(f"remote access error: {reason}", errno=errno.EACCES))
            encoded = reason.encode()[:MAX_REASON]
            try:
                self._send_raw([header(Kind.NAK, length=len(encoded)), encoded])
                self._sock.shutdown(socket.SHUT_WR)
                scratch = bytearray(1 << 16)
                while self._sock.recv_into(scratch):
                    pass
            except OSError:
                pass
        except RemoteProtocolError as exc:
            self._fail(TransportError(f"bad frame from peer: {exc}", errno=errno.EPROTO))
        except (OSError, ConnectionError) as exc:
            self._fail(TransportError(f"connection lost: {exc}", errno=getattr(exc, "errno", None)
                                      or errno.ECONNRESET))

    def _send_raw(self, buffers: Sequence[bytes | memoryview]) -> None:
        with self._send_lock:
            send_all(self._sock, buffers)

    def _place_write(self, rkey: int, addr: int, length: int) -> None:
        with self._keys:
            known = self._by_rkey.get(rkey)
            if known is None:
                raise _RemoteAccessError(
                    f"rkey={rkey:#x} was never granted or was already deregistered")
            region, view = known
            start = addr - region.addr
            if length == 0 or start < 0 or start + length > region.length:
                raise _RemoteAccessError(
                    f"write of {length} bytes at {addr:#x} is outside the region "
                    f"{region.addr:#x}-{region.addr + region.length:#x} of rkey={rkey:#x}")
            if not recv_exact(self._sock, view[start:start + length]):
                raise ConnectionError("peer closed the connection in a write")

    def _take_message(self, length: int) -> None:
        if length > wire.MAX_MESSAGE:
            raise RemoteProtocolError(
                f"length={length} at offset 24: SEND over the 512 KiB maximum")
        message = bytearray(length)
        if length and not recv_exact(self._sock, memoryview(message)):
            raise ConnectionError("peer closed the connection in a SEND")
        with self._cond:
            self._inbox.append(bytes(message))
            self._cond.notify_all()

    def _read_reason(self, length: int) -> str:
        if length > MAX_REASON:
            return f"(reason of {length} bytes, too long to show)"
        raw = bytearray(length)
        if length:
            recv_exact(self._sock, memoryview(raw))
        return raw.decode("utf-8", "replace")

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout=10)
        self._sock.close()
        self._fail(TransportError("connection closed", errno=errno.ESHUTDOWN))
        with self._keys:
            for region, _view in self._regions.drain():
                self._unpin(region)
