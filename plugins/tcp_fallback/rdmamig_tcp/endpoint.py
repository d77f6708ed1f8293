"""A TCP endpoint with RDMA semantics: control SEND / RECV, registration that really
pins (mlock), and one-sided writes placed by receiver threads, over one or more
lanes (TCP connections; see :mod:`rdmamig_tcp.frames` for how they keep order).

Each lane's receiver thread plays the part of the NIC: it reads every frame, places
WRITE payloads straight into registered memory with ``recv_into`` (no copy in
Python), acknowledges signaled writes, and queues control messages for
:meth:`TcpEndpoint.recv_message`. A write with a key that was never granted, was
deregistered, or reaches outside its region is a remote access error: nothing of
it is written, on any lane; the writer gets a NAK with the reason and both ends go
to the error state, as an RC queue pair does.
"""

from __future__ import annotations

import array
import contextlib
import errno
import itertools
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterator, Sequence
from typing import NamedTuple

from rdmamig import pinning, wire
from rdmamig.caps import Capability
from rdmamig.errors import RemoteProtocolError, TransportError
from rdmamig.regions import EndpointBase
from rdmamig.transport import MemoryRegion, RemoteWrite

from .frames import (
    EXTENT,
    FENCE,
    FRAME,
    FRAME_TIMEOUT,
    LANE_UNIT,
    MAX_REASON,
    PART,
    SIGNALED,
    Kind,
    Registered,
    header,
    recv_exact,
)
from .lanes import Lane

#: Seconds close() gives queued frames to reach a peer that is not reading.
CLOSE_TIMEOUT = 2.0
#: Control messages received and not taken yet. The protocol has at most a few in
#: flight (one per READY); a peer that sends more is not waiting for READY, which
#: an RDMA receiver refuses too (receiver not ready).
MAX_INBOX = 16


class _RemoteAccessError(Exception):
    """A peer's write that must not be placed."""


class _Stopped(Exception):
    """The endpoint is in the error state: a receiver places nothing more."""


class TcpEndpoint(EndpointBase[memoryview]):
    """A connected TCP endpoint over ``socks`` (lane 0 first). Made by
    :class:`~rdmamig_tcp.TcpBackend`."""

    def __init__(self, socks: Sequence[socket.socket], *, capabilities: Capability) -> None:
        super().__init__()
        self.capabilities = capabilities
        # Guards the key tables. A receiver holds its lane's ``placing`` lock while it
        # places a write (and names the region in ``placing_into``); a deregistration
        # takes the lock of each lane placing into its region, so that it waits for
        # those writes, as ibv_dereg_mr waits for the NIC. Lock order: a lane's
        # ``placing``, then ``_keys``; deregistration never holds both.
        self._keys = threading.Lock()
        # Guards the inbox, the lanes' counters and the error state.
        self._cond = threading.Condition()
        # Orders posting: tickets and fences match what the lanes' queues hold.
        self._posting = threading.Lock()
        # Remotely writable regions by rkey: what the peer's writes are checked against.
        self._by_rkey: dict[int, tuple[MemoryRegion, memoryview]] = {}
        self._key_pool: list[int] = []
        # Control messages with their fences (the writes to place before each).
        self._inbox: deque[tuple[tuple[int, ...], bytes]] = deque()
        self._tickets = itertools.count(1)
        self._last_ticket = 0  # the batch posted last
        self._error: TransportError | None = None
        self._closed = False
        # Called by a receiver once each write it places has landed, before it
        # lets go of the region (watch_placements).
        self._placed: Callable[[int, int], None] | None = None
        self._lanes = [Lane(sock, index, on_send_error=self._send_failed)
                       for index, sock in enumerate(socks)]
        self._receivers = [threading.Thread(target=self._receive_loop, args=(lane,),
                                            name=f"rdmamig-tcp-rx{lane.index}", daemon=True)
                           for lane in self._lanes]
        for thread in self._receivers:
            thread.start()

    @property
    def lanes(self) -> int:
        """How many TCP connections this endpoint stripes its writes over."""
        return len(self._lanes)

    # ------------------------------------------------------------ control channel

    def send_message(self, *, data: bytes) -> None:
        self.check_message(data)
        self._check()
        with self._posting:
            fence = b"".join(FENCE.pack(lane.posted_writes) for lane in self._lanes)
            self._lanes[0].push([header(Kind.SEND, length=len(fence) + len(data)), fence, data])

    def recv_message(self, *, timeout: float | None) -> bytes:
        with self._cond:
            self._wait_until(lambda: bool(self._inbox)
                             and self._fence_passed(self._inbox[0][0]),
                             timeout, f"no control message within {timeout} s")
            return self._inbox.popleft()[1]

    def _fence_passed(self, fence: tuple[int, ...]) -> bool:
        return all(lane.placed_writes >= count
                   for lane, count in zip(self._lanes, fence, strict=True))

    # ------------------------------------------------------------ registration

    def register(self, *, buffer: memoryview, remote_write: bool) -> MemoryRegion:
        view = self.byte_view(buffer)
        address = pinning.buffer_address(view, writable=remote_write)
        # Memory only read (a write's source) is locked as it is read, as a read-only
        # registration with on-demand paging would be: holes never read stay holes.
        pinning.mlock(address, view.nbytes, on_fault=not remote_write)
        with self._keys:
            lkey = self._new_key(self._regions)
            rkey = self._new_key(self._by_rkey) if remote_write else 0
            region = MemoryRegion(addr=address, length=view.nbytes, lkey=lkey, rkey=rkey)
            self._regions.add(region, view)
            if rkey:
                self._by_rkey[rkey] = (region, view)
        return region

    def _new_key(self, table: Container[int]) -> int:
        # Random and unguessable, like an rkey should be; never 0 ("no key"). Drawn
        # from a pool refilled 1024 keys at a time: one getrandom() per key would
        # release and retake the GIL on every registration.
        while True:
            if not self._key_pool:
                self._key_pool = list(array.array("I", secrets.token_bytes(4096)))
            key = self._key_pool.pop()
            if key and key not in table:
                return key

    def deregister(self, *, region: MemoryRegion) -> None:
        with self._keys:
            self._regions.remove(region)
            self._by_rkey.pop(region.rkey, None)  # no write into it starts from now
            busy = [lane for lane in self._lanes if lane.placing_into is region]
        # A write into it that had started is placed before it is unpinned. Writes
        # into other regions go on: waiting for them would stall every UNREGISTER
        # behind the bulk of the data.
        for lane in busy:
            with lane.placing:
                pass
        pinning.munlock(region.addr, region.length)

    # ------------------------------------------------------------ one-sided writes

    def post_writes(self, *, writes: Sequence[RemoteWrite]) -> int:
        return self._post(writes, None)

    def post_writes_with(self, *, writes: Sequence[RemoteWrite],
                         alongside: Callable[[], None]) -> int:
        if len(self._lanes) > 1:
            # A lane carries only its share of the batch: reading all of it there
            # would hold that lane back while the others finish theirs.
            return super().post_writes_with(writes=writes, alongside=alongside)
        return self._post(writes, alongside)

    def _post(self, writes: Sequence[RemoteWrite], alongside: Callable[[], None] | None) -> int:
        """Queue ``writes`` on the lanes; ``alongside`` runs on the first lane that
        carries some of them, before it sends them."""
        self.check_batch(writes)
        self._check()
        # Per lane, in posting order: the pieces of writes it carries.
        pieces: list[list[_Piece]] = [[] for _ in self._lanes]
        with self._keys:
            for write in writes:
                _region, view = self._regions.source_of(write)
                local = view[write.offset:write.offset + write.length]
                split = self._split(write.remote_addr, write.length)
                whole = (write.remote_addr, write.length) if len(split) > 1 else None
                for at, length in split:
                    index = (write.remote_addr + at) // LANE_UNIT % len(self._lanes)
                    pieces[index].append(_Piece(write.remote_addr + at, write.rkey,
                                                local[at:at + length], whole))
        with self._posting:
            ticket = self._last_ticket = next(self._tickets)
            for lane, mine in zip(self._lanes, pieces, strict=True):
                lane.posted_writes += len(mine)
                first = None
                if mine and alongside is not None:
                    first, alongside = self._guarded(alongside), None
                lane.push(_write_frames(mine, ticket), first=first)
        return ticket

    def _guarded(self, work: Callable[[], None]) -> Callable[[], None]:
        """``work`` for a lane's thread: what it raises puts the endpoint in the
        error state (a waiter raises it), and the lane sends nothing more."""
        def run() -> None:
            try:
                work()
            except Exception as exc:
                self._fail(TransportError(f"work beside a batch of writes failed: {exc!r}"))
                raise OSError(errno.ECANCELED, "the batch is not sent") from exc
        return run

    def watch_placements(self, placed: Callable[[int, int], None]) -> bool:
        self._placed = self._guarded_placed(placed)
        return True

    def _guarded_placed(self, placed: Callable[[int, int], None]) -> Callable[[int, int], None]:
        def run(addr: int, length: int) -> None:
            try:
                placed(addr, length)
            except Exception as exc:
                self._fail(TransportError(f"watching a placed write failed: {exc!r}"))
        return run

    def _split(self, remote_addr: int, length: int) -> list[tuple[int, int]]:
        """(offset, length) pieces of a write, cut where the remote address crosses
        into another lane's unit; the whole write when there is one lane."""
        if len(self._lanes) == 1:
            return [(0, length)]
        pieces, at = [], 0
        while at < length:
            unit_end = (remote_addr + at) // LANE_UNIT * LANE_UNIT + LANE_UNIT
            size = min(length - at, unit_end - remote_addr - at)
            pieces.append((at, size))
            at += size
        return pieces

    def wait_writes(self, *, ticket: int, timeout: float | None) -> None:
        with self._cond:
            self._wait_until(lambda: min(lane.acked for lane in self._lanes) >= ticket,
                             timeout, f"writes of batch {ticket} not completed within "
                                      f"{timeout} s")

    def _wait_until(self, ready: Callable[[], bool], timeout: float | None,
                    timed_out: str) -> None:
        """With ``_cond`` held: wait until ``ready()``; the error state or the
        timeout (``timed_out`` says what did not happen) raises instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if self._error is not None:
                raise self._error
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TransportError(timed_out, errno=errno.ETIMEDOUT)
            self._cond.wait(remaining)

    # ------------------------------------------------------------ plumbing

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _send_failed(self, exc: OSError) -> None:
        # The receivers usually know why (a NAK with the reason, EOF): give them a
        # moment to say so before falling back to the bare errno.
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None, timeout=2.0)
        self._fail(TransportError(f"send failed: {exc.strerror or exc}", errno=exc.errno))

    def _fail(self, error: TransportError) -> None:
        """Enter the error state (first error wins) and wake every waiter."""
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    def _receive_loop(self, lane: Lane) -> None:
        head = memoryview(bytearray(FRAME.size))
        try:
            while recv_exact(lane.sock, head, timeout=FRAME_TIMEOUT, idle=True):
                kind, flags, rkey, addr, wr_id, length = FRAME.unpack(head)
                if kind == Kind.WRITE:
                    extent = (addr, length)
                    if flags & PART:
                        extent = self._read_extent(lane, addr, length)
                        length -= EXTENT.size
                    self._place_write(lane, rkey, addr, length, extent)
                    if flags & SIGNALED:
                        lane.push([header(Kind.ACK, wr_id=wr_id)])
                elif kind == Kind.MARK:
                    lane.push([header(Kind.ACK, wr_id=wr_id)])
                elif kind == Kind.SEND and lane.index == 0:
                    self._take_message(lane, length)
                elif kind == Kind.ACK:
                    with self._cond:
                        lane.acked = max(lane.acked, wr_id)
                        self._cond.notify_all()
                elif kind == Kind.NAK:
                    reason = self._read_reason(lane, length)
                    self._fail(TransportError(f"remote access error: {reason}",
                                              errno=errno.EACCES))
                    return
                else:
                    raise RemoteProtocolError(
                        f"kind={kind} at offset 0: no such frame on lane {lane.index}")
            self._fail(TransportError("peer closed the connection", errno=errno.ECONNRESET))
        except _Stopped:
            return
        except _RemoteAccessError as exc:
            # Like an RC responder: place nothing, tell the writer why, and stop the
            # queue pair. Half-close and drain, so the NAK is read before any reset.
            reason = str(exc)
            self._fail(TransportError(f"remote access error: {reason}", errno=errno.EACCES))
            encoded = reason.encode()[:MAX_REASON]
            lane.push([header(Kind.NAK, length=len(encoded)), encoded])
            lane.half_close()
            scratch = bytearray(1 << 16)
            with contextlib.suppress(OSError):
                while lane.sock.recv_into(scratch):
                    pass
        except RemoteProtocolError as exc:
            self._fail(TransportError(f"bad frame from peer: {exc}", errno=errno.EPROTO))
        except TimeoutError as exc:
            self._fail(TransportError(f"peer stalled in a frame: {exc}", errno=errno.ETIMEDOUT))
        except (OSError, ConnectionError) as exc:
            self._fail(TransportError(f"connection lost: {exc}", errno=getattr(exc, "errno", None)
                                      or errno.ECONNRESET))

    def _read_extent(self, lane: Lane, addr: int, length: int) -> tuple[int, int]:
        """The whole write a PART piece of ``length`` bytes (its extent included) at
        ``addr`` belongs to; the piece must lie within it."""
        if length < EXTENT.size:
            raise RemoteProtocolError(f"length={length} at offset 24: a PART write "
                                      f"shorter than its {EXTENT.size}-byte extent")
        raw = bytearray(EXTENT.size)
        if not recv_exact(lane.sock, memoryview(raw), timeout=FRAME_TIMEOUT):
            raise ConnectionError("peer closed the connection in a write")
        start, whole = EXTENT.unpack(raw)
        if not start <= addr <= addr + length - EXTENT.size <= start + whole:
            raise RemoteProtocolError(
                f"extent at offset 28: a piece of {length - EXTENT.size} bytes at "
                f"{addr:#x} outside its write of {whole} bytes at {start:#x}")
        return start, whole

    def _place_write(self, lane: Lane, rkey: int, addr: int, length: int,
                     extent: tuple[int, int]) -> None:
        """Place the peer's write of ``length`` bytes at ``addr``, a piece of the
        write ``extent`` (address, length), which must lie within the region."""
        with lane.placing:
            with self._keys:
                if self._error is not None:
                    raise _Stopped
                known = self._by_rkey.get(rkey)
                if known is None:
                    raise _RemoteAccessError(
                        f"rkey={rkey:#x} was never granted or was already deregistered")
                region, view = known
                start = addr - region.addr
                first, whole = extent[0] - region.addr, extent[1]
                if length == 0 or first < 0 or first + whole > region.length:
                    raise _RemoteAccessError(
                        f"write of {whole} bytes at {extent[0]:#x} is outside the region "
                        f"{region.addr:#x}-{region.addr + region.length:#x} of rkey={rkey:#x}")
                lane.placing_into = region
            try:
                if not recv_exact(lane.sock, view[start:start + length],
                                  timeout=FRAME_TIMEOUT):
                    raise ConnectionError("peer closed the connection in a write")
                if self._placed is not None:
                    # Still placing: deregistering the region waits until the
                    # watcher has read it.
                    self._placed(addr, length)
            finally:
                lane.placing_into = None
        with self._cond:
            lane.placed_writes += 1
            if self._inbox:  # a control message may be waiting for this write
                self._cond.notify_all()

    def _take_message(self, lane: Lane, length: int) -> None:
        fence_size = FENCE.size * len(self._lanes)
        if not fence_size <= length <= fence_size + wire.MAX_MESSAGE:
            raise RemoteProtocolError(
                f"length={length} at offset 24: SEND not between its {fence_size}-byte "
                f"fence and the 512 KiB maximum")
        with self._cond:
            if len(self._inbox) >= MAX_INBOX:
                raise RemoteProtocolError(f"SEND with {MAX_INBOX} messages not taken yet: "
                                          f"the peer does not wait for READY")
        payload = bytearray(length)
        if not recv_exact(lane.sock, memoryview(payload), timeout=FRAME_TIMEOUT):
            raise ConnectionError("peer closed the connection in a SEND")
        fence = tuple(FENCE.unpack_from(payload, FENCE.size * index)[0]
                      for index in range(len(self._lanes)))
        with self._cond:
            self._inbox.append((fence, bytes(payload[fence_size:])))
            self._cond.notify_all()

    def _read_reason(self, lane: Lane, length: int) -> str:
        if length > MAX_REASON:
            return f"(reason of {length} bytes, too long to show)"
        raw = bytearray(length)
        if length:
            recv_exact(lane.sock, memoryview(raw), timeout=FRAME_TIMEOUT)
        return raw.decode("utf-8", "replace")

    # ------------------------------------------------------------ fault injection

    def lane_socket(self, lane: int = 0) -> socket.socket:
        """Lane ``lane``'s connection, for writing frames past the endpoint (tests of
        what a peer's malformed or cut-off frames do)."""
        return self._lanes[lane].sock

    @contextlib.contextmanager
    def stalled(self, *lanes: int) -> Iterator[None]:
        """Hold the receivers of ``lanes`` before they place their next write, as a
        slow path of the network would, until the block ends."""
        held = [self._lanes[lane].placing for lane in lanes]
        for lock in held:
            lock.acquire()
        try:
            yield
        finally:
            for lock in held:
                lock.release()

    def placing_into(self, lane: int = 0) -> MemoryRegion | None:
        """The region lane ``lane``'s receiver is placing a write into now, if any."""
        return self._lanes[lane].placing_into

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
        # What was posted goes out first (a reply just sent, say), as a QP's send
        # queue drains before the QP is destroyed; then the connections go.
        for lane in self._lanes:
            lane.finish_sending(timeout=CLOSE_TIMEOUT)
        with self._cond:
            # Writes the peer has not completed may still be in the kernel's queues,
            # by reference to memory we hand back: as destroying a queue pair
            # flushes its work requests, the connections are reset (none of it
            # leaves after this) instead of closed behind their queues.
            unfinished = any(lane.acked < self._last_ticket for lane in self._lanes)
        self._fail(TransportError("connection closed", errno=errno.ESHUTDOWN))
        for lane in self._lanes:
            lane.shutdown()
        for thread in self._receivers:
            thread.join(timeout=10)
        self._placed = None  # it holds the watcher's memory: not for as long as we live
        for lane in self._lanes:
            lane.close(reset=unfinished)
        with self._keys:
            self._by_rkey.clear()
            for region, _view in self._regions.drain():
                pinning.munlock(region.addr, region.length)


class _Piece(NamedTuple):
    """What one lane carries of a write: all of it, or one piece of a write split
    over lanes (then ``whole`` is the write's remote address and length)."""

    remote_addr: int
    rkey: int
    data: memoryview
    whole: tuple[int, int] | None


def _write_frames(pieces: Sequence[_Piece], ticket: int) -> list[bytes | Registered]:
    """A lane's part of batch ``ticket``: its writes, the last one signaled, or a
    MARK when the batch has none for it (every lane completes every batch)."""
    if not pieces:
        return [header(Kind.MARK, wr_id=ticket, flags=SIGNALED)]
    frames: list[bytes | Registered] = []
    for position, piece in enumerate(pieces):
        last = position == len(pieces) - 1
        flags = SIGNALED if last else 0
        extent = b"" if piece.whole is None else EXTENT.pack(*piece.whole)
        if extent:
            flags |= PART
        frames.append(header(Kind.WRITE, length=len(extent) + piece.data.nbytes,
                             rkey=piece.rkey, remote_addr=piece.remote_addr,
                             wr_id=ticket if last else 0, flags=flags))
        if extent:
            frames.append(extent)
        frames.append(Registered(piece.data))
    return frames
