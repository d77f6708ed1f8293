"""The TCP backend's framing: what an RDMA NIC would put on the wire, over streams.

Every frame starts with one 28-byte header; a payload of ``length`` bytes follows
for the frames that have one.

    kind (u8), flags (u8), padding (u16), rkey (u32), remote_addr (u64),
    wr_id (u64), length (u32)

One endpoint is one or more TCP connections ("lanes"; multifd's channels). Lane 0
carries the handshake and every control SEND; WRITEs go to the lane their remote
2 MiB unit maps to, so writes to the same bytes always travel one lane, in order. A
write that crosses units travels as pieces, one per unit, flagged ``PART``: each
piece's payload opens with the whole write's extent (``EXTENT``), which every lane
checks against the region before it places its piece, so a write that reaches
outside its region is refused by every lane and writes nothing, as an RDMA WRITE
checked on its first packet does. A
SEND's payload starts with one u64 per lane, the WRITE frames posted on that lane
before it: the receiver hands the message on only once it has placed that many, so
a write posted before a SEND is placed before the SEND is received, as on an RC
queue pair.
"""

from __future__ import annotations

import enum
import socket
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .zerocopy import PageSender

FRAME: Final = struct.Struct("!BBxxIQQI")
#: Identifies an rdmamig TCP connect request (then 8 bytes of private data).
MAGIC: Final = b"RDMAMIG\x03"
#: Longest REJECT / NAK reason we accept.
MAX_REASON: Final = 4096
#: Most lanes one endpoint may have.
MAX_LANES: Final = 16
#: Writes are spread over lanes by this unit of the remote address.
LANE_UNIT: Final = 2 << 20
#: The whole write a ``PART`` piece belongs to (remote address, length): it opens
#: the piece's payload.
EXTENT: Final = struct.Struct("!QI")
#: Per-lane write counts that open a SEND's payload.
FENCE: Final = struct.Struct("!Q")
#: Kernel limit on iovecs per sendmsg (IOV_MAX), less room for a header.
MAX_IOV: Final = 1000


class Kind(enum.IntEnum):
    """Frame kinds."""

    CONNECT = 1  # payload: MAGIC + private data; rkey: lanes wanted
    ACCEPT = 2  # payload: private data; rkey: lanes granted, wr_id: join token
    REJECT = 3  # payload: reason (UTF-8)
    SEND = 4  # payload: a u64 write count per lane, then one control message
    WRITE = 5  # payload: bytes for remote_addr under rkey
    ACK = 6  # completion of the signaled WRITE wr_id
    NAK = 7  # remote access error; payload: reason (UTF-8)
    JOIN = 8  # opens lane rkey of the connection wr_id (the join token)
    MARK = 9  # signaled, writes nothing: a batch's completion on a lane it left empty


SIGNALED: Final = 0x01
#: A WRITE that is one piece of a longer write: its payload opens with ``EXTENT``.
PART: Final = 0x02


def header(
    kind: Kind, *, length: int = 0, rkey: int = 0, remote_addr: int = 0, wr_id: int = 0,
    flags: int = 0,
) -> bytes:
    """One frame header."""
    return FRAME.pack(kind, flags, rkey, remote_addr, wr_id, length)


class Registered:
    """A WRITE's payload: bytes of registered memory, which stay alive until the
    write completes, so :func:`send_all` may send them without copying. Its
    length is its bytes', as a buffer's."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view.cast("B")

    def __len__(self) -> int:
        return self.view.nbytes


def send_all(sock: socket.socket, buffers: Sequence[bytes | memoryview | Registered], *,
             timeout: float | None = None, pages: PageSender | None = None) -> None:
    """Send every buffer in order: sendmsg gathers them without copying them in
    Python and resumes partial sends; with ``pages``, a :class:`Registered`
    payload goes by reference (:mod:`rdmamig_tcp.zerocopy`). With ``timeout`` (and
    :func:`set_wakeups`), a peer that stops reading for that long makes it raise
    TimeoutError instead of blocking for ever."""
    deadline = None if timeout is None else time.monotonic() + timeout
    copied: list[memoryview] = []
    for position, item in enumerate(buffers):
        if isinstance(item, Registered):
            view = item.view
            if pages is not None and pages.takes(view):
                _sendmsg_all(sock, copied, deadline, timeout, more=True)
                copied = []
                view = view[pages.send(sock, view, more=position < len(buffers) - 1,
                                       deadline=deadline, timeout=timeout):]
        else:
            view = memoryview(item).cast("B")
        if view.nbytes:
            copied.append(view)
    _sendmsg_all(sock, copied, deadline, timeout, more=False)


def _sendmsg_all(sock: socket.socket, pending: list[memoryview], deadline: float | None,
                 timeout: float | None, *, more: bool) -> None:
    """sendmsg ``pending`` (consumed) until all of it is sent; ``more``: bytes
    follow at once (MSG_MORE: they may share segments)."""
    flags = socket.MSG_MORE if more else 0
    while pending:
        try:
            sent = sock.sendmsg(pending[:MAX_IOV], [], flags)
        except BlockingIOError:  # a wake-up: no room in the peer's window meanwhile
            check_deadline(deadline, timeout)
            continue
        while sent:
            if sent >= pending[0].nbytes:
                sent -= pending[0].nbytes
                pending.pop(0)
            else:
                pending[0] = pending[0][sent:]
                sent = 0


#: How often a blocked send or receive wakes to look at its deadline.
WAKE_SECONDS: Final = 0.5
#: Seconds a frame has, from its first byte, to arrive whole, and a send to find
#: room: a peer that stops halfway through a write breaks the connection instead of
#: holding its region, and one that stops reading cannot block us for ever.
FRAME_TIMEOUT: Final = 30.0


def check_deadline(deadline: float | None, timeout: float | None) -> None:
    """After a send's wake-up without progress: raise TimeoutError once ``deadline``
    (``timeout`` seconds after the send started) has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(f"the peer read nothing for {timeout} s") from None


def set_wakeups(sock: socket.socket) -> None:
    """Make blocking sends and receives on ``sock`` return every
    :data:`WAKE_SECONDS` without progress (EAGAIN, SO_SNDTIMEO / SO_RCVTIMEO), so
    that :func:`send_all` and :func:`recv_exact` can keep deadlines. A socket
    timeout would not do: it is one per socket, and a lane's sender and receiver
    are two threads with deadlines of their own."""
    seconds = int(WAKE_SECONDS)
    wake = struct.pack("ll", seconds, int((WAKE_SECONDS - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, wake)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, wake)


def recv_exact(sock: socket.socket, into: memoryview, *, timeout: float | None = None,
               idle: bool = False) -> bool:
    """Fill ``into`` from the socket straight into its memory. False on a clean EOF
    before the first byte; ConnectionError on EOF in the middle.

    With ``timeout``, all of ``into`` must arrive within that many seconds (from the
    call, or with ``idle`` from its first byte: a connection may be quiet between
    frames, not in one), else TimeoutError; the socket needs
    :func:`set_wakeups`. A peer dripping one byte at a time is held to it."""
    got = 0
    size = into.nbytes
    deadline = None if timeout is None or idle else time.monotonic() + timeout
    while got < size:
        try:
            count = sock.recv_into(into[got:], size - got, socket.MSG_WAITALL)
        except BlockingIOError:  # a wake-up without data
            count = -1
        if count == 0:
            if got == 0:
                return False
            raise ConnectionError(f"peer closed the connection after {got} of {size} bytes")
        if count > 0:
            if got == 0 and deadline is None and timeout is not None:
                deadline = time.monotonic() + timeout
            got += count
        if got < size and deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"{got} of {size} bytes arrived within {timeout} s")
    return True
