"""One RC queue pair: control SEND / RECV, memory registration (ibv_reg_mr) and RDMA
WRITE, with completions polled from one CQ.

Receives are posted ahead – ``RECV_DEPTH`` buffers of 512 KiB, the protocol's largest
message – so a READY promise always has a buffer behind it. A wait polls the CQ with
short sleeps for up to ``SPIN_SECONDS``, then arms the CQ and sleeps in ``select`` on
its completion channel (:class:`~rdmamig_verbs.events.CompletionChannel`), as QEMU's
own RDMA code blocks on its channel: a peer that takes its time (a QEMU source
between two messages) finds rdmamig asleep, not spinning on the CPU it needs. Writes
wait for room in the send queue, which also keeps the signalled completions within
what the CQ holds.
Any failed work completion puts the endpoint in the error state; every later call
raises it.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs
from rdmamig import pinning, wire
from rdmamig.caps import Capability
from rdmamig.errors import TransportError
from rdmamig.regions import EndpointBase
from rdmamig.transport import MemoryRegion, RemoteWrite

from .events import CompletionChannel

RECV_DEPTH = 4
#: Send-queue slots: a few batches of writes in flight plus the control SENDs.
SEND_DEPTH = 512
#: Of those, kept for control SENDs: writes wait for room beyond the rest.
CONTROL_SLOTS = 8
_RECV_BASE = 1 << 48
_SEND_ID = 1 << 49
#: Idle wait between two empty polls of the CQ.
_POLL_SLEEP = 20e-6
#: How long a wait polls before it sleeps on the completion channel.
SPIN_SECONDS = 200e-6
#: The longest sleep on the channel: rdma_cm's events and the deadline are looked at
#: again after it.
_SLEEP_SECONDS = 0.05


def control_buffer(pv: Any, pd: Any) -> Any:
    """A registered 512 KiB buffer for one control message.

    Raises:
        MemlockLimitError: RLIMIT_MEMLOCK leaves no room for it.
    """
    try:
        return pv.mr.MR(pd, wire.MAX_MESSAGE, pv.enums.IBV_ACCESS_LOCAL_WRITE)
    except pv.pyverbs_error.PyverbsRDMAError as exc:
        raise pinning.pin_refused(exc.error_code, wire.MAX_MESSAGE, "ibv_reg_mr of a "
                                  "control buffer") from None


@attrs.frozen
class _Pinned:
    """An MR and the memory it covers (kept alive while registered)."""

    mr: Any
    view: memoryview


class VerbsEndpoint(EndpointBase[_Pinned]):
    """A connected queue pair. Made by :class:`~rdmamig_verbs.VerbsBackend`."""

    def __init__(self, pv: Any, *, cmid: Any, events: Any, pd: Any, cq: Any, qp: Any,
                 recv_mrs: list[Any], capabilities: Capability,
                 completions: CompletionChannel | None = None) -> None:
        super().__init__()
        self._pv = pv
        self._completions = completions
        self.capabilities = capabilities
        self._cmid, self._events, self._pd, self._cq, self._qp = cmid, events, pd, cq, qp
        self._recv_mrs = recv_mrs
        self._recv_requests = [self.recv_request(pv, mr, index)
                               for index, mr in enumerate(recv_mrs)]
        self._send_mr = control_buffer(pv, pd)
        self._poll_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._keys = threading.Lock()
        self._inbox: deque[bytes] = deque()
        self._send_done = True
        self._tickets = itertools.count(1)
        self._completed = 0
        # Batches posted and not seen completed, oldest first: (ticket, work requests).
        self._in_send_queue: deque[tuple[int, int]] = deque()
        self._error: TransportError | None = None
        self._closed = False

    @staticmethod
    def recv_request(pv: Any, mr: Any, index: int) -> Any:
        """The work request that posts receive buffer ``index``."""
        sge = pv.wr.SGE(mr.buf, wire.MAX_MESSAGE, mr.lkey)
        return pv.wr.RecvWR(wr_id=_RECV_BASE + index, num_sge=1, sg=[sge])

    @staticmethod
    def post_recv(pv: Any, qp: Any, mr: Any, index: int) -> None:
        """Post receive buffer ``index`` (before connecting)."""
        qp.post_recv(VerbsEndpoint.recv_request(pv, mr, index))

    # ------------------------------------------------------------ completions

    def _poll(self) -> bool:
        """Handle what the CQ has; True if anything was there."""
        pv = self._pv
        with self._poll_lock:
            count, completions = self._cq.poll(num_entries=16)
            for wc in completions[:count]:
                if wc.status != pv.enums.IBV_WC_SUCCESS:
                    self._fail_from(wc)
                    continue
                if wc.wr_id >= _SEND_ID:
                    self._send_done = True
                elif wc.wr_id >= _RECV_BASE:
                    index = wc.wr_id - _RECV_BASE
                    mr = self._recv_mrs[index]
                    self._inbox.append(bytes(mr.read(wc.byte_len, 0)))
                    if self._error is None:  # posted again, the same request each time
                        self._qp.post_recv(self._recv_requests[index])
                else:
                    self._completed = max(self._completed, wc.wr_id)
        return bool(count > 0)

    def _fail_from(self, wc: Any) -> None:
        pv = self._pv
        status = wc.status
        if status == pv.enums.IBV_WC_REM_ACCESS_ERR:
            what = "remote access error (bad rkey or a range outside the registered region)"
        else:
            try:
                what = pv.enums.ibv_wc_status(status).name  # newer rdma-core
            except (AttributeError, ValueError):
                what = f"work completion status {status}"
        if self._error is None:
            self._error = TransportError(f"{what} (vendor error {wc.vendor_err}); the queue "
                                         f"pair is in the error state", errno=errno.EIO)

    def _wait(self, done: Any, *, timeout: float | None, what: str) -> None:
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_until = now + SPIN_SECONDS
        while not done():
            if self._error is not None:
                raise self._error
            if self._poll():
                spin_until = time.monotonic() + SPIN_SECONDS
                continue
            self._check_connection()
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise TransportError(f"{what} within {timeout} s", errno=errno.ETIMEDOUT)
            if self._completions is None or now < spin_until:
                time.sleep(_POLL_SLEEP)
                continue
            # Armed, then polled once more: a completion that came in between would
            # raise no event.
            self._cq.req_notify()
            if self._poll():
                continue
            self._completions.wait(self._cq, _SLEEP_SECONDS if deadline is None
                                   else max(min(_SLEEP_SECONDS, deadline - now), 0.0))

    def _check_connection(self) -> None:
        # With an external QP, rdma_cm only reports a disconnect as an event: the
        # QP itself waits for retries to run out. Turn the event into the error.
        event = self._events.poll()
        if event is not None and "DISCONNECTED" in event and self._error is None:
            self._error = TransportError("peer closed the connection (rdma_cm DISCONNECTED)",
                                         errno=errno.ECONNRESET)

    # ------------------------------------------------------------ control channel

    def send_message(self, *, data: bytes) -> None:
        self.check_message(data)
        if self._error is not None:
            raise self._error
        pv = self._pv
        with self._send_lock:
            self._send_mr.write(data, len(data))
            self._send_done = False
            sge = pv.wr.SGE(self._send_mr.buf, len(data), self._send_mr.lkey)
            wr = pv.wr.SendWR(wr_id=_SEND_ID, opcode=pv.enums.IBV_WR_SEND, num_sge=1, sg=[sge],
                              send_flags=pv.enums.IBV_SEND_SIGNALED)
            self._post(wr)
            self._wait(lambda: self._send_done, timeout=30, what="no SEND completion")

    def recv_message(self, *, timeout: float | None) -> bytes:
        self._wait(lambda: bool(self._inbox), timeout=timeout, what="no control message")
        return self._inbox.popleft()

    # ------------------------------------------------------------ registration

    def register(self, *, buffer: memoryview, remote_write: bool) -> MemoryRegion:
        pv = self._pv
        view = self.byte_view(buffer)
        address = pinning.buffer_address(view, writable=remote_write)
        # A write's source is only read: a read-only registration neither breaks
        # copy-on-write (KSM-merged pages stay merged) nor asks for write access.
        access = (pv.enums.IBV_ACCESS_LOCAL_WRITE | pv.enums.IBV_ACCESS_REMOTE_WRITE
                  if remote_write else 0)
        try:
            mr = pv.mr.MR(self._pd, view.nbytes, access, address=address)
        except pv.pyverbs_error.PyverbsRDMAError as exc:
            raise pinning.pin_refused(exc.error_code, view.nbytes, "ibv_reg_mr") from None
        region = MemoryRegion(addr=address, length=view.nbytes, lkey=mr.lkey,
                              rkey=mr.rkey if remote_write else 0)
        with self._keys:
            self._regions.add(region, _Pinned(mr=mr, view=view))
        return region

    def deregister(self, *, region: MemoryRegion) -> None:
        with self._keys:
            self._regions.remove(region).mr.close()

    # ------------------------------------------------------------ one-sided writes

    def post_writes(self, *, writes: Sequence[RemoteWrite]) -> int:
        self.check_batch(writes)
        if self._error is not None:
            raise self._error
        with self._keys:
            sources = [self._regions.source_of(write)[0] for write in writes]
        room = SEND_DEPTH - CONTROL_SLOTS
        with self._send_lock:
            # Tickets are taken in the order of posting: completions come in that
            # order, and a ticket seen completed says every one before it is.
            for start in range(0, len(writes), room):
                ticket = next(self._tickets)
                self._post_chain(writes[start:start + room], sources[start:start + room],
                                 ticket, room)
        return ticket

    def _post_chain(self, writes: Sequence[RemoteWrite], sources: Sequence[MemoryRegion],
                    ticket: int, room: int) -> None:
        """Post ``writes`` as one chain of work requests (one ``ibv_post_send``, one
        doorbell) once the send queue has room for it; the last names ``ticket``.
        A batch longer than the queue goes as several chains, each signalled, since
        the slots of unsignalled requests come back only with a later completion."""
        pv = self._pv
        requests: list[Any] = []
        for position, (write, region) in enumerate(zip(writes, sources, strict=True)):
            last = position == len(writes) - 1
            sge = pv.wr.SGE(region.addr + write.offset, write.length, region.lkey)
            # Only the last write is signalled and names the chain: a completion of
            # any other (wr_id 0) could never be taken for the chain's end.
            wr = pv.wr.SendWR(wr_id=ticket if last else 0,
                              opcode=pv.enums.IBV_WR_RDMA_WRITE, num_sge=1, sg=[sge],
                              send_flags=pv.enums.IBV_SEND_SIGNALED if last else 0)
            wr.set_wr_rdma(write.rkey, write.remote_addr)
            if requests:
                requests[-1].next_wr = wr
            requests.append(wr)
        # A full send queue refuses a post: wait for earlier chains to complete.
        self._wait(lambda: self._send_queue_used() + len(requests) <= room, timeout=30,
                   what="no room in the send queue: earlier writes not completed")
        # ``requests`` keeps every link alive until the post returns.
        self._post(requests[0])
        self._in_send_queue.append((ticket, len(requests)))

    def _send_queue_used(self) -> int:
        """Work requests of write batches not yet completed (a signalled completion
        frees its batch's slots)."""
        while self._in_send_queue and self._in_send_queue[0][0] <= self._completed:
            self._in_send_queue.popleft()
        return sum(count for _ticket, count in self._in_send_queue)

    def _post(self, wr: Any) -> None:
        try:
            self._qp.post_send(wr)
        except self._pv.pyverbs_error.PyverbsRDMAError as exc:
            self._error = self._error or TransportError(f"ibv_post_send failed: {exc}",
                                                        errno=exc.error_code)
            raise self._error from None

    def wait_writes(self, *, ticket: int, timeout: float | None) -> None:
        self._wait(lambda: self._completed >= ticket, timeout=timeout,
                   what=f"writes of batch {ticket} not completed")

    # ------------------------------------------------------------ closing

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = self._error or TransportError("connection closed", errno=errno.ESHUTDOWN)
        with contextlib.suppress(Exception):  # the peer may be gone already
            self._cmid.disconnect()
        with self._keys:
            for _region, pinned in self._regions.drain():
                pinned.mr.close()
        # Children before parents: QP, CQ and its channel, buffers, PD's other users,
        # then the id.
        for resource in (self._qp, self._cq, self._completions, self._send_mr,
                         *self._recv_mrs, self._cmid, self._events):
            if resource is not None:
                with contextlib.suppress(Exception):
                    resource.close()
