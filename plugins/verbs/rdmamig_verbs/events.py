"""Waiting for rdma_cm events without holding the GIL.

pyverbs' ``CMEvent(channel)`` blocks in ``rdma_get_cm_event`` while holding the GIL,
which freezes every other thread of the process (both ends of a test live in one
process). So the channel's file descriptor is made non-blocking and waited on with
``select`` – which releases the GIL – before the event is read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import time
from typing import Any

from rdmamig.errors import TransportError

_RDMA_CM_DEVICE = "/dev/infiniband/rdma_cm"


def _cm_fds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == _RDMA_CM_DEVICE:
                found.add(int(name))
        except OSError:
            continue
    return found


class EventChannel:
    """A pyverbs ``CMEventChannel`` whose events are awaited with a timeout."""

    def __init__(self, pv: Any) -> None:
        self._pv = pv
        before = _cm_fds()
        self.channel = pv.cmid.CMEventChannel()
        new = _cm_fds() - before
        if len(new) != 1:
            raise TransportError("cannot find the rdma_cm event channel's descriptor")
        self.fd = new.pop()
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    def wait(self, expected: set[int], *, timeout: float | None, what: str) -> Any:
        """The next event, which must be one of ``expected`` (rdma_cm event types).

        Raises:
            TransportError: timeout, or another event (rejected, unreachable, ...).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
            readable, _, _ = select.select([self.fd], [], [], remaining)
            if not readable:
                raise TransportError(f"{what}: no rdma_cm event within {timeout} s",
                                     errno=errno.ETIMEDOUT)
            try:
                event = self._pv.cmid.CMEvent(self.channel)
            except self._pv.pyverbs_error.PyverbsRDMAError as exc:
                if exc.error_code in (errno.EAGAIN, errno.EWOULDBLOCK):
                    continue
                raise TransportError(f"{what}: {exc}", errno=exc.error_code) from None
            if event.event_type in expected:
                return event
            name = event.event_str()
            data = bytes(event.private_data or b"")
            event.ack_cm_event()
            raise _unexpected(what, name, data)

    def poll(self) -> str | None:
        """The name of a pending event (acknowledged), or None; does not block."""
        readable, _, _ = select.select([self.fd], [], [], 0)
        if not readable:
            return None
        try:
            event = self._pv.cmid.CMEvent(self.channel)
        except self._pv.pyverbs_error.PyverbsRDMAError:
            return None
        name = str(event.event_str())
        event.ack_cm_event()
        return name

    def close(self) -> None:
        self.channel.close()


def _unexpected(what: str, name: str, data: bytes) -> TransportError:
    if "REJECTED" in name:
        reason = data.rstrip(b"\0").decode("utf-8", "replace")
        return TransportError(f"{what}: refused by the peer" + (f": {reason}" if reason else ""),
                              errno=errno.ECONNREFUSED)
    return TransportError(f"{what}: {name}", errno=errno.ECONNREFUSED if "UNREACHABLE" in name
                          else errno.EIO)
