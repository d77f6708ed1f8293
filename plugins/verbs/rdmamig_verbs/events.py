"""Waiting for rdma_cm events without holding the GIL.

pyverbs' ``CMEvent(channel)`` blocks in ``rdma_get_cm_event`` while holding the GIL,
which freezes every other thread of the process (both ends of a test live in one
process). So the channel's file descriptor is made non-blocking and waited on with
``select`` – which releases the GIL – before the event is read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import time
from collections.abc import Callable
from typing import Any, TypeVar

from rdmamig.errors import TransportError

_RDMA_CM_DEVICE = "/dev/infiniband/rdma_cm"
_T = TypeVar("_T")
#: What /proc/self/fd shows for a uverbs event file (a completion channel's).
_VERBS_EVENTS = "anon_inode:[infinibandevent]"


def _fds(target: str) -> set[int]:
    """This process's descriptors that link to ``target``."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                found.add(int(name))
        except OSError:
            continue
    return found


def _made_with_descriptor(make: Callable[[], _T], target: str, what: str) -> tuple[_T, int]:
    """``make()``'s object and the one descriptor linking to ``target`` it opened,
    made non-blocking (pyverbs does not say which descriptor is its own).

    Raises:
        TransportError: no single new descriptor (another thread opened one at the
            same moment); the object is closed.
    """
    before = _fds(target)
    made = make()
    new = _fds(target) - before
    if len(new) != 1:
        with contextlib.suppress(Exception):
            made.close()  # type: ignore[attr-defined]
        raise TransportError(f"cannot find the {what}'s descriptor")
    fd = new.pop()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return made, fd


class CompletionChannel:
    """A pyverbs ``CompChannel`` whose notifications are awaited with ``select``:
    ``get_cq_event`` would block holding the GIL, as ``CMEvent`` does. pyverbs does
    not say which descriptor is the channel's; it is the uverbs event file that
    appears when the channel is made.

    Raises:
        TransportError: that descriptor cannot be told apart (another thread made
            one at the same moment); the caller then polls without sleeping on it.
    """

    def __init__(self, pv: Any, context: Any) -> None:
        self._pv = pv
        self.channel, self.fd = _made_with_descriptor(lambda: pv.cq.CompChannel(context),
                                                      _VERBS_EVENTS, "completion channel")

    def wait(self, cq: Any, timeout: float) -> None:
        """Sleep until ``cq`` (armed with ``req_notify``) has a completion, or for
        ``timeout`` seconds; the notification is taken and acknowledged."""
        readable, _, _ = select.select([self.fd], [], [], timeout)
        if readable:
            try:
                self.channel.get_cq_event(cq)
            except self._pv.pyverbs_error.PyverbsRDMAError:
                return  # another waiter took it
            cq.ack_events(1)

    def close(self) -> None:
        self.channel.close()


class EventChannel:
    """A pyverbs ``CMEventChannel`` whose events are awaited with a timeout."""

    def __init__(self, pv: Any) -> None:
        self._pv = pv
        self.channel, self.fd = _made_with_descriptor(pv.cmid.CMEventChannel, _RDMA_CM_DEVICE,
                                                      "rdma_cm event channel")

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
