"""Real pinning of memory with mlock(2), and the clear error when it is refused.

Backends without a kernel driver of their own (TCP) pin with ``mlock``; the verbs
backend's ``ibv_reg_mr`` pins the same way inside the kernel and is bound by the same
``RLIMIT_MEMLOCK``. Both report a refusal through :func:`memlock_error`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import resource

import numpy as np

from .errors import MemlockLimitError, RegistrationError
from .units import size_text

# libc through the process itself (dlopen(NULL)): find_library runs ldconfig, a
# process of its own, at every start.
_LIBC = None
# Two handles on libc: calls through CDLL release the GIL, calls through PyDLL keep
# it. Pinning a few MiB of resident memory takes microseconds, less than getting
# the GIL back from the threads that feed the sockets would; long calls release it.
_libc = ctypes.CDLL(_LIBC, use_errno=True)
_libc_holding_gil = ctypes.PyDLL(_LIBC, use_errno=True)
for _lib in (_libc, _libc_holding_gil):
    _lib.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _lib.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _lib.mlock2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
#: Ranges up to this size are (un)pinned without releasing the GIL.
SHORT_CALL_BYTES = 16 << 20
#: mlock2(2) flag: lock pages as they are faulted in, fault none in now.
MLOCK_ONFAULT = 1


def buffer_address(buffer: memoryview, *, writable: bool = True) -> int:
    """Virtual address of the first byte of a contiguous buffer, which must be
    writable if ``writable`` (memory that is only read, a write's source, need not)."""
    if writable and buffer.readonly:
        raise RegistrationError("cannot register read-only memory for writing")
    if not buffer.c_contiguous:
        raise RegistrationError("cannot register non-contiguous memory")
    if buffer.nbytes == 0:
        raise RegistrationError("cannot register an empty range")
    return int(np.frombuffer(buffer.cast("B"), dtype=np.uint8).ctypes.data)


def locked_bytes() -> int:
    """Bytes of this process that count against ``RLIMIT_MEMLOCK``, per the kernel:
    ``VmLck`` (mlock, what the TCP backend pins) plus ``VmPin`` (pinned by a driver,
    what ``ibv_reg_mr`` pins) in /proc/self/status."""
    # One pread on a file kept open: the engine samples this once per batch, and
    # each system call hands the GIL to the busy socket threads and waits for it.
    text = os.pread(_status_fd(), 16384, 0).decode("ascii", "replace")
    return sum(int(kb) * 1024 for kb in re.findall(r"^Vm(?:Lck|Pin):\s+(\d+) kB", text,
                                                    re.MULTILINE))


_status: tuple[int, int] | None = None  # (pid, fd of its /proc/<pid>/status)


def _status_fd() -> int:
    global _status
    pid = os.getpid()
    if _status is None or _status[0] != pid:  # first call, or a forked child
        _status = (pid, os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC))
    return _status[1]


def memlock_limit() -> int:
    """The soft ``RLIMIT_MEMLOCK`` in bytes (``resource.RLIM_INFINITY`` when unlimited)."""
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]


#: Bit of CAP_IPC_LOCK in the capability sets of /proc/self/status.
_CAP_IPC_LOCK = 14


def memlock_applies() -> bool:
    """Whether ``RLIMIT_MEMLOCK`` binds this process: it does not with CAP_IPC_LOCK
    in the effective set (root usually has it)."""
    with open("/proc/self/status") as status:
        match = re.search(r"^CapEff:\s+([0-9a-f]+)", status.read(), re.MULTILINE)
    return not (match and int(match.group(1), 16) >> _CAP_IPC_LOCK & 1)


def _format_bytes(count: int) -> str:
    return f"{count} bytes ({size_text(count)})"


def memlock_error(requested: int, what: str = "pin") -> MemlockLimitError:
    """The error for a registration refused under ``RLIMIT_MEMLOCK``: how much was
    asked, what the limit is, and how to raise it."""
    limit, locked = memlock_limit(), locked_bytes()
    shown = "unlimited" if limit == resource.RLIM_INFINITY else _format_bytes(limit)
    return MemlockLimitError(
        f"cannot {what} {_format_bytes(requested)}: RLIMIT_MEMLOCK is {shown} and "
        f"{_format_bytes(locked)} are already locked by this process. Raise the limit "
        f"(`ulimit -l unlimited`, `LimitMEMLOCK=infinity` for a systemd service, a "
        f"`memlock` line in /etc/security/limits.conf), run with CAP_IPC_LOCK, or "
        f"choose an unpin policy that keeps pinned memory under the limit "
        f"(see `rdmamig policies`)",
        requested=requested,
        limit=limit,
        locked=locked,
    )


def pin_refused(code: int, length: int, what: str) -> RegistrationError:
    """The error for a pin of ``length`` bytes refused with errno ``code`` by
    ``what`` (``mlock``, ``ibv_reg_mr``). ENOMEM, EPERM and EAGAIN are how the
    kernel refuses a pin over ``RLIMIT_MEMLOCK`` – and ENOMEM and EAGAIN also how it
    says memory is short: the limit is blamed only when it applies and this pin
    would pass it."""
    if code not in (errno.ENOMEM, errno.EPERM, errno.EAGAIN):
        return RegistrationError(f"{what} of {length} bytes failed: {os.strerror(code)}")
    limit = memlock_limit()
    over = limit != resource.RLIM_INFINITY and locked_bytes() + length > limit
    if code == errno.EPERM or (over and memlock_applies()):
        return memlock_error(length)
    return RegistrationError(
        f"{what} of {_format_bytes(length)} failed: {os.strerror(code)}, and not because "
        f"of RLIMIT_MEMLOCK ({_format_bytes(locked_bytes())} locked, limit "
        f"{'unlimited' if limit == resource.RLIM_INFINITY else _format_bytes(limit)}"
        f"{'' if memlock_applies() else ', not applied: CAP_IPC_LOCK'}): the machine is "
        f"short of memory it can lock")


def mlock(address: int, length: int, *, on_fault: bool = False) -> None:
    """Lock ``length`` bytes at ``address`` into RAM; ``on_fault``: each page when
    it is first touched (MLOCK_ONFAULT), so that pages never read (holes) are
    neither faulted in nor allocated.

    Raises:
        MemlockLimitError: refused by ``RLIMIT_MEMLOCK`` (ENOMEM / EPERM / EAGAIN).
        RegistrationError: any other failure.
    """
    lib = _lib_for(length)
    if (lib.mlock2(address, length, MLOCK_ONFAULT) if on_fault
            else lib.mlock(address, length)) != 0:
        raise pin_refused(ctypes.get_errno(), length, "mlock")


def munlock(address: int, length: int) -> None:
    """Unlock a range locked with :func:`mlock` (failures are not fatal: the range
    is being released anyway)."""
    _lib_for(length).munlock(address, length)


def _lib_for(length: int) -> ctypes.CDLL:
    return _libc_holding_gil if length <= SHORT_CALL_BYTES else _libc
