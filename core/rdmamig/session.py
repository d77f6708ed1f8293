"""The control channel in use: the state machine of :mod:`rdmamig.control` driven
over an endpoint, with QEMU's ``exchange_send`` / ``exchange_recv`` and the QEMU FILE
byte stream as file-like objects."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Collection

from . import wire
from .caps import Capability
from .control import ControlState, Role
from .errors import LocalProtocolError, PeerAbortedError, RemoteProtocolError, TransportError
from .transport import ControlChannel
from .wire import Command, Message

#: Every message sent and received, at DEBUG (``rdmamig -vv``).
log = logging.getLogger("rdmamig.protocol")


def describe(message: Message) -> str:
    """A message as ``-vv`` shows it: its name, and how many entries it has."""
    entries = getattr(message, "entries", None)
    if entries is not None:
        return f"{message.TYPE.label} ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'})"
    if isinstance(message, wire.QemuFile):
        return f"{message.TYPE.label} ({len(message.data)} bytes)"
    return message.TYPE.label


class ControlSession:
    """One side of a conversation on a control channel.

    Args:
        channel: the endpoint's control channel.
        role: SOURCE or DESTINATION.
        capabilities: what was negotiated; enables the extension messages.
        timeout: seconds to wait for any one message (None: forever).
    """

    def __init__(self, channel: ControlChannel, *, role: Role, capabilities: Capability,
                 timeout: float | None = 60.0) -> None:
        self.channel = channel
        self.state = ControlState(role)
        self.capabilities = capabilities
        self.timeout = timeout

    # ------------------------------------------------------------ one message

    def send(self, message: Message) -> None:
        """Send one message the state machine allows now.

        Raises:
            LocalProtocolError: not allowed in this state.
            TransportError: the channel failed.
        """
        self.state.send(message.TYPE)
        self.channel.send_message(data=wire.encode(message))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %s", self.state.role.name.lower(), describe(message))

    def recv(self) -> Message:
        """Receive, parse and check one message.

        Raises:
            PeerAbortedError: the peer sent ERROR.
            RemoteProtocolError: malformed, or not allowed in this state.
            TransportError: the channel failed or timed out.
        """
        data = self.channel.recv_message(timeout=self.timeout)
        message = wire.decode_untrusted(data, extensions=self.capabilities)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s <- %s", self.state.role.name.lower(), describe(message))
        self.state.receive(message.TYPE)
        if isinstance(message, wire.ErrorMessage):
            if message.reason:  # the peer's words, escaped: they cannot drive a terminal
                raise PeerAbortedError(f"the {self._peer} gave up: "
                                       f"{message.reason.encode('unicode_escape').decode()}")
            raise PeerAbortedError(f"the {self._peer} sent ERROR: migration aborted")
        return message

    @property
    def _peer(self) -> str:
        return "destination" if self.state.role is Role.SOURCE else "source"

    # ------------------------------------------------------------ QEMU's exchanges

    def wait_ready(self) -> None:
        """Source: wait for the destination's READY (a receive is posted for us)."""
        self._expect(self.recv(), {Command.READY})

    def exchange_send(self, message: Message, *, reply: Command | None = None
                      ) -> Message | None:
        """Wait for READY, send ``message`` and, if ``reply`` is given, wait for it.

        A caller with work to do between the send and the reply (the source posts
        writes there) calls :meth:`wait_ready`, :meth:`send` and :meth:`recv_reply`.

        Raises:
            RemoteProtocolError: the peer answered with another command.
            PeerAbortedError, TransportError: as :meth:`recv`.
        """
        self.wait_ready()
        return self.send_request(message, reply=reply)

    def send_request(self, message: Message, *, reply: Command | None) -> Message | None:
        """Send ``message`` on a READY already received and wait for ``reply``.

        Raises:
            as :meth:`exchange_send`.
        """
        self.send(message)
        return None if reply is None else self.recv_reply(reply)

    def recv_reply(self, reply: Command) -> Message:
        """Receive the next message, which must be ``reply``.

        Raises:
            as :meth:`exchange_send`.
        """
        return self._expect(self.recv(), {reply})

    def exchange_recv(self, expected: Collection[Command] | None = None) -> Message:
        """Send READY and receive the next message, checking its type when
        ``expected`` is given (None: anything the state machine allows).

        Raises:
            RemoteProtocolError: a message of another type arrived.
            PeerAbortedError, TransportError: as :meth:`recv`.
        """
        self.send(wire.Ready())
        message = self.recv()
        return message if expected is None else self._expect(message, expected)

    def _expect(self, message: Message, expected: Collection[Command]) -> Message:
        if message.TYPE not in expected:
            wanted = " or ".join(c.label for c in expected)
            raise RemoteProtocolError(f"type={int(message.TYPE)} at offset 4: got "
                                      f"{message.TYPE.label}, expected {wanted}")
        return message

    def abort(self, reason: str = "") -> None:
        """Tell the peer we hit a fatal error (ERROR, with ``reason`` if the peer
        takes one: Capability.REASONS), if the channel still works."""
        if not self.state.may_send(Command.ERROR):
            return
        with contextlib.suppress(TransportError, LocalProtocolError):
            self.send(wire.ErrorMessage(
                reason=reason if self.capabilities & Capability.REASONS else ""))


class QemuFileWriter(io.RawIOBase):
    """The source's end of the QEMU FILE stream: bytes written here travel as QEMU
    FILE messages of at most 32 KiB, each after the destination's READY."""

    def __init__(self, session: ControlSession) -> None:
        super().__init__()
        self._session = session
        self._pending = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._pending += data
        while len(self._pending) >= wire.QEMU_FILE_PIECE:
            self._send_piece(wire.QEMU_FILE_PIECE)
        return len(data)

    def flush(self) -> None:
        while self._pending:
            self._send_piece(len(self._pending))

    def _send_piece(self, size: int) -> None:
        piece = bytes(self._pending[:size])
        del self._pending[:size]
        self._session.exchange_send(wire.QemuFile(data=piece))


class QemuFileReader(io.RawIOBase):
    """The destination's end of the QEMU FILE stream.

    Like QEMU's ``get_buffer``, a read that finds the buffer empty refills it by
    calling ``fill`` – which, on a destination, sends READY and handles whatever
    message arrives until one carries stream bytes.
    """

    def __init__(self, fill: Callable[[], bytes]) -> None:
        super().__init__()
        self._fill = fill
        self._buffer = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, into: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(into).cast("B")
        while not self._buffer:
            self._buffer += self._fill()
        count = min(len(view), len(self._buffer))
        view[:count] = self._buffer[:count]
        del self._buffer[:count]
        return count

    def take_buffered(self) -> bytes:
        """The bytes received and not read yet (to hand the stream to another
        reader)."""
        out, self._buffer = bytes(self._buffer), bytearray()
        return out

    def read_exact(self, size: int) -> bytes:
        """Exactly ``size`` bytes of the stream (refilling as often as needed)."""
        out = bytearray()
        while len(out) < size:
            chunk = self.read(size - len(out))
            out += chunk or b""
        return bytes(out)
