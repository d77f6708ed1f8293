"""Sending registered memory without copying it, as a NIC reads a WRITE's source.

``vmsplice(2)`` hands the pages of a buffer to a pipe by reference and ``splice(2)``
moves them on to the socket: the kernel queues the pages themselves, and the only
copy is the one into the receiver's memory. The bytes are read whenever the
kernel sends them, until the peer has them, so only memory that stays alive and
registered until its write completes may go this way: a WRITE's source, which the
engine holds pinned until then and treats as RDMA does (changed before the
completion, a page may go old or new; the source's dirty tracking sends it again).
Headers and control messages are copied, as before. An endpoint closed with writes
not completed resets its connections, so nothing of them leaves after that (as a
queue pair destroyed with work outstanding flushes it). On one host (loopback, a
veth pair) what the peer's socket has received and not read yet still refers to
the pages until the peer reads it or closes.

Where the kernel refuses (no ``vmsplice``, a mapping it cannot take pages of), the
bytes go by ``sendmsg`` instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket

from rdmamig import pinning

from .frames import check_deadline

#: Pipe capacity asked for: the bytes one vmsplice / splice pair moves.
PIPE_BYTES = 1 << 20
#: Payloads smaller than a chunk are copied: for them the system calls and page
#: references of each payload cost more than the copy (benchmarks/README.md).
MIN_SPLICE_BYTES = 1 << 20


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


# Through CDLL: the call releases the GIL, as os.splice does.
_libc = ctypes.CDLL(None, use_errno=True)
_vmsplice = getattr(_libc, "vmsplice", None)
if _vmsplice is not None:
    _vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_size_t, ctypes.c_uint]
    _vmsplice.restype = ctypes.c_ssize_t
#: Errors that mean this kernel or mapping cannot lend its pages: copy instead.
_CANNOT = {errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.EFAULT, errno.EOPNOTSUPP}


class PageSender:
    """One lane's pipe for sending payloads by reference; used by one thread at a
    time (the lane's sending lock)."""

    def __init__(self) -> None:
        self._pipe: tuple[int, int] | None = None
        #: Whether to try: False once the kernel refused for good.
        self.enabled = _vmsplice is not None and hasattr(os, "splice")

    def takes(self, view: memoryview) -> bool:
        """Whether :meth:`send` tries to send ``view`` by reference (else it is
        for the caller to copy)."""
        return self.enabled and view.nbytes >= MIN_SPLICE_BYTES

    def send(self, sock: socket.socket, view: memoryview, *, more: bool,
             deadline: float | None, timeout: float | None) -> int:
        """Send the bytes of ``view`` (registered memory) without copying them;
        ``more``: other bytes follow at once. Returns how many went so: the
        caller sends the rest, which is all of it when the kernel would not.

        Raises:
            OSError: the connection failed.
            TimeoutError: the peer read nothing until ``deadline`` (``timeout``
                seconds after the caller started).
        """
        if not self.takes(view):
            return 0
        address = pinning.buffer_address(view, writable=False)
        reading, writing = self._pipe or self._open()
        sent = 0
        while sent < view.nbytes:
            vector = _IoVec(address + sent, min(PIPE_BYTES, view.nbytes - sent))
            lent = _vmsplice(writing, ctypes.byref(vector), 1, 0)  # type: ignore[misc]
            if lent == 0:
                return sent
            if lent < 0:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                if code in (errno.ENOSYS, errno.EPERM):
                    self.enabled = False
                if code in _CANNOT:
                    return sent
                raise OSError(code, os.strerror(code))
            last = sent + lent == view.nbytes
            try:
                self._drain(reading, sock, lent, more=more or not last, deadline=deadline,
                            timeout=timeout)
            except BaseException:
                self.close()  # bytes may be left in it: the next send starts afresh
                raise
            sent += lent
        return sent

    def _open(self) -> tuple[int, int]:
        reading, writing = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # over the user's limit: the default size
            fcntl.fcntl(writing, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._pipe = (reading, writing)
        return self._pipe

    @staticmethod
    def _drain(reading: int, sock: socket.socket, count: int, *, more: bool,
               deadline: float | None, timeout: float | None) -> None:
        flags = os.SPLICE_F_MOVE | (os.SPLICE_F_MORE if more else 0)
        while count:
            try:
                count -= os.splice(reading, sock.fileno(), count, flags=flags)
            except BlockingIOError:  # a wake-up (SO_SNDTIMEO): no room meanwhile
                check_deadline(deadline, timeout)

    def close(self) -> None:
        """Close the pipe (a later send opens another)."""
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
