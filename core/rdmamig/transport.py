"""The interfaces a backend implements: small ABCs with keyword-only methods.

A backend (TCP, verbs, a third party's) provides a :class:`Backend` that makes
:class:`Listener` and :class:`Endpoint` objects. An endpoint is one connected queue
pair: a :class:`ControlChannel` for SEND / RECV of control messages, a
:class:`MemoryRegistry` that pins memory and hands out keys, and a
:class:`RemoteWriter` for one-sided writes into the peer's registered memory.
Capabilities are negotiated at connect time (:mod:`rdmamig.caps`).

Resources are context managers; ``close()`` is idempotent and releases everything the
object owns (an endpoint's close deregisters every region it registered).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import ClassVar, Self

import attrs

from .caps import Capability


def address_text(host: str, port: int) -> str:
    """``host:port`` as people write it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.frozen(kw_only=True)
class MemoryRegion:
    """A registered (pinned) range of local memory.

    Attributes:
        addr: virtual address of the first byte (what a peer adds offsets to).
        length: bytes in the range.
        lkey: key for using the range as the source of our own writes.
        rkey: key a peer uses to write into the range (0 when not remotely writable).
    """

    addr: int
    length: int
    lkey: int
    rkey: int


@attrs.frozen(kw_only=True)
class RemoteWrite:
    """One one-sided write: ``length`` bytes at ``offset`` of local ``region`` go to
    ``remote_addr`` in the peer's memory registered under ``rkey``."""

    region: MemoryRegion
    offset: int
    length: int
    remote_addr: int
    rkey: int


class _Closing(abc.ABC):
    @abc.abstractmethod
    def close(self) -> None:
        """Release everything this object owns. Calling it again does nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ControlChannel(abc.ABC):
    """SEND and RECV of whole control messages (header + data portion)."""

    @abc.abstractmethod
    def send_message(self, *, data: bytes) -> None:
        """Send one control message (at most 512 KiB).

        Raises:
            TransportError: the connection is closed, broken or in the error state.
        """

    @abc.abstractmethod
    def recv_message(self, *, timeout: float | None) -> bytes:
        """Wait for the next control message and return its bytes, unparsed.

        Raises:
            TransportError: the peer closed or broke the connection, a remote access
                error put it in the error state, or ``timeout`` seconds passed
                (``errno.ETIMEDOUT``).
        """


class MemoryRegistry(abc.ABC):
    """Registration (pinning) of local memory, with pinned-bytes accounting."""

    @abc.abstractmethod
    def register(self, *, buffer: memoryview, remote_write: bool) -> MemoryRegion:
        """Pin ``buffer`` (contiguous) and return its keys.

        Args:
            buffer: the memory; it must stay alive until deregistered. Without
                ``remote_write`` it is only read (a write's source): it may be
                read-only, and it is registered for reading only.
            remote_write: whether the peer may write into it (gets an rkey; the
                memory must be writable).

        Raises:
            MemlockLimitError: pinning would exceed ``RLIMIT_MEMLOCK``.
            RegistrationError: any other refusal.
        """

    @abc.abstractmethod
    def deregister(self, *, region: MemoryRegion) -> None:
        """Unpin ``region``; its rkey stops working at once.

        Raises:
            LocalProtocolError: ``region`` is not registered here.
        """

    @property
    @abc.abstractmethod
    def pinned_bytes(self) -> int:
        """Bytes currently registered through this registry."""

    @property
    @abc.abstractmethod
    def pinned_peak_bytes(self) -> int:
        """The most bytes that were registered at any one time."""


class RemoteWriter(abc.ABC):
    """One-sided writes into the peer's registered memory."""

    @abc.abstractmethod
    def post_writes(self, *, writes: Sequence[RemoteWrite]) -> int:
        """Start a batch of writes; only the last one signals completion.

        Returns:
            A ticket for :meth:`wait_writes`.

        Raises:
            LocalProtocolError: a write's local range is not inside its region.
            TransportError: the connection is broken or in the error state.
        """

    @abc.abstractmethod
    def wait_writes(self, *, ticket: int, timeout: float | None) -> None:
        """Wait until the batch ``ticket`` (and every write before it) is placed in
        the peer's memory.

        Raises:
            TransportError: a write failed (for example a remote access error for a
                bad key or range), the connection broke, or the timeout passed.
        """

    def post_writes_with(self, *, writes: Sequence[RemoteWrite],
                         alongside: Callable[[], None]) -> int:
        """:meth:`post_writes`, and run ``alongside()``, which reads the writes'
        source memory, while they go: here, once they are posted. A backend that
        sends from a thread of its own runs it there, just before it sends them:
        the thread that reads the memory next finds it in cache, and no other
        thread competes with the sending for a CPU. Either way it has run once
        the batch completes.
        """
        ticket = self.post_writes(writes=writes)
        alongside()
        return ticket


class Endpoint(ControlChannel, MemoryRegistry, RemoteWriter, _Closing):
    """One connection to a peer. ``capabilities`` is what was negotiated."""

    capabilities: Capability

    def watch_placements(self, placed: Callable[[int, int], None]) -> bool:
        """Have ``placed(addr, length)`` called after each of the peer's writes
        (or each piece of one, where the backend splits them) lands in memory
        registered here, on the thread that placed it, before it places more
        and before the region can be deregistered; whether this endpoint can. A
        write placed by a NIC passes no CPU of ours: RDMA cannot, and neither can
        this base class.
        """
        return False


class Listener(_Closing):
    """A bound, listening endpoint on the destination side."""

    #: Whether connections accepted here may be open at the same time (else one is
    #: served at a time: accept() again once the last one is closed).
    concurrent: ClassVar[bool] = True

    @property
    @abc.abstractmethod
    def address(self) -> tuple[str, int]:
        """The host and port actually bound (port 0 asks for any free port)."""

    @abc.abstractmethod
    def accept(self, *, timeout: float | None) -> Endpoint:
        """Wait for a source whose connection handshake succeeds and return the
        connection. A connection that fails its handshake (an invalid protocol
        version, a required capability not asked for, a stranger's bytes, no
        answer in time) is refused with the reason, logged, and does not end the
        wait.

        Raises:
            TransportError: the timeout passed or the listener failed.
        """


class Backend(abc.ABC):
    """A transport, registered by a plugin under :attr:`name`.

    ``cls()`` must work with no arguments (``rdmamig backends`` does that); a backend
    may take keyword options (the verbs backend's ``device``), which the CLI passes
    from its own options.
    """

    #: The name users select it by (``--backend NAME``).
    name: ClassVar[str]
    #: One line for ``rdmamig backends``.
    description: ClassVar[str] = ""
    #: Capabilities this transport can honour (PIN_ALL etc.).
    supported: ClassVar[Capability] = Capability(0)
    #: Most connections a source can stripe its writes over (``channels=N`` as a
    #: constructor option when it is more than 1).
    max_channels: ClassVar[int] = 1

    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run on this machine, or None when it can."""

    @abc.abstractmethod
    def listen(self, *, host: str, port: int, supported: Capability,
               required: Capability = Capability(0)) -> Listener:
        """Bind and listen on ``host``:``port`` (IPv4 or IPv6), granting what sources
        ask for of ``supported`` and refusing those that do not ask for all of
        ``required``.

        Raises:
            TransportError: the address cannot be bound.
            BackendUnavailableError: the backend cannot run here.
        """

    @abc.abstractmethod
    def connect(
        self, *, host: str, port: int, requested: Capability, timeout: float | None
    ) -> Endpoint:
        """Connect to a destination, asking for ``requested`` capabilities.

        Raises:
            TransportError: unreachable, refused (with the peer's reason) or timed out.
            RemoteProtocolError: the destination's reply is malformed.
            BackendUnavailableError: the backend cannot run here.
        """
