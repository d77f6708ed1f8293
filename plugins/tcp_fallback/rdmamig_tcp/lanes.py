"""One lane of a TCP endpoint: a connected socket, the thread that sends on it, and
the counters that order its writes against control messages.

Sending happens on the lane's own thread, as a NIC works through its send queue:
posting returns at once, several lanes send at the same time (the GIL is released
in ``sendmsg`` and ``splice``), and the caller prepares its next batch meanwhile.
A WRITE's payload goes by reference where the kernel can (:mod:`.zerocopy`), as a
NIC reads it from memory itself.
A small push to an idle lane is sent by the caller itself: handing it to the thread
would cost more than sending it.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from rdmamig.transport import MemoryRegion

from .frames import FRAME_TIMEOUT, Registered, send_all, set_wakeups
from .zerocopy import PageSender

#: SO_LINGER on, 0 seconds: close() resets the connection and drops its queues.
_ABORT = struct.pack("ii", 1, 0)
#: A queue item: half-close the socket once everything before it is sent.
_SHUT_WR = object()

Frames = Sequence[bytes | memoryview | Registered]


class _Prepared(NamedTuple):
    """A queue item: frames, and the work to do on the sender thread before them."""

    first: Callable[[], None]
    frames: Frames


#: A push of at most this many bytes to an idle lane is sent by the caller.
DIRECT_SEND_BYTES = 1 << 20


class Lane:
    """A socket of an endpoint and its sender thread.

    Args:
        sock: the connected socket (handshake done).
        index: the lane's number; lane 0 carries the control messages.
        on_send_error: called on the sender thread when a send fails; the lane
            sends nothing more.
    """

    def __init__(self, sock: socket.socket, index: int, *,
                 on_send_error: Callable[[OSError], None]) -> None:
        sock.settimeout(None)
        set_wakeups(sock)  # sends and receives keep deadlines
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.index = index
        #: WRITE frames queued on this lane (the sender's side of a SEND's fence).
        self.posted_writes = 0
        #: The highest batch ticket the peer has completed on this lane.
        self.acked = 0
        #: The peer's WRITE frames placed from this lane (the receiver's side).
        self.placed_writes = 0
        #: Held while one of the peer's writes is placed, into ``placing_into``
        #: (set with the endpoint's key table locked): deregistering that region
        #: waits for it.
        self.placing = threading.Lock()
        self.placing_into: MemoryRegion | None = None
        self._queue: queue.SimpleQueue[Frames | _Prepared | object | None] = queue.SimpleQueue()
        # Pushes not sent yet, and who may write to the socket: the sender thread or
        # a caller sending directly, one at a time and in push order.
        self._unsent = 0
        self._state = threading.Lock()
        self._sending = threading.Lock()
        self._on_send_error = on_send_error
        # TLS encrypts every byte: only a plain socket can send pages by reference.
        self._pages = PageSender() if isinstance(sock, socket.socket) else None
        self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                        name=f"rdmamig-tcp-tx{index}")
        self._sender.start()

    def push(self, frames: Frames, *, first: Callable[[], None] | None = None) -> None:
        """Send ``frames`` (headers and payloads, without copying) after everything
        pushed before: queued for the sender thread, or sent now when they are
        small and the lane is idle. ``first``: run on the sender thread before
        they are sent (an OSError it raises fails the lane as a send would)."""
        if first is not None:
            with self._state:
                self._unsent += 1
            self._queue.put(_Prepared(first, frames))
            return
        with self._state:
            direct = (self._unsent == 0
                      and sum(len(frame) for frame in frames) <= DIRECT_SEND_BYTES)
            self._unsent += 1
            if direct:
                # Taken before the state lock is released: nothing pushed later can
                # reach the socket first.
                self._sending.acquire()
        if not direct:
            self._queue.put(frames)
            return
        try:
            send_all(self.sock, frames, timeout=FRAME_TIMEOUT, pages=self._pages)
        except OSError as exc:
            self._on_send_error(exc)
        finally:
            self._sending.release()
            with self._state:
                self._unsent -= 1

    def half_close(self) -> None:
        """Shut the sending direction once everything pushed so far is sent."""
        with self._state:
            self._unsent += 1
        self._queue.put(_SHUT_WR)

    def _send_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                with self._sending:
                    if item is _SHUT_WR:
                        self.sock.shutdown(socket.SHUT_WR)
                    elif isinstance(item, _Prepared):
                        item.first()
                        send_all(self.sock, item.frames, timeout=FRAME_TIMEOUT,
                                 pages=self._pages)
                    else:
                        send_all(self.sock, item,  # type: ignore[arg-type]
                                 timeout=FRAME_TIMEOUT, pages=self._pages)
            except OSError as exc:
                self._on_send_error(exc)
                return
            finally:
                with self._state:
                    self._unsent -= 1

    def finish_sending(self, *, timeout: float) -> None:
        """Let the sender thread send what is queued, then stop it (a send that is
        still blocked after ``timeout`` seconds ends with :meth:`shutdown`)."""
        self._queue.put(None)
        self._sender.join(timeout)

    def shutdown(self) -> None:
        """Break the connection both ways: blocked sends and receives return."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self, *, reset: bool = False) -> None:
        """Close the socket once the sender thread is gone (after :meth:`shutdown`);
        with ``reset``, abort the connection: what its queues still hold is dropped."""
        self._sender.join(timeout=10)
        if reset:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
        self.sock.close()
        if self._pages is not None and not self._sender.is_alive():  # else it may use it
            self._pages.close()
