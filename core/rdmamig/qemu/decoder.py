"""A precopy migration stream decoded as it arrives, sans IO: feed it bytes, it
hands RAM to a sink a run of records at a time and keeps the rest.

It follows what ``qemu_loadvm_state`` takes from a precopy source: the header, the
configuration, the ``ram`` section's START (the block list), PARTs and END, then the
device state to the end of the stream. What precopy RAM migration does not put
there (postcopy and other commands, iterable sections other than ``ram``, device
state before the RAM is done) is refused with the offset where it appears.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs

from ..errors import ImageError, RemoteProtocolError, StreamError, TruncatedError
from . import ram, stream
from .origin import QemuOrigin
from .ram import RamBlockInfo, RecordSink, Stop
from .stream import Configuration, DeviceState, DeviceStateTail, Kind, SectionHeader

#: The iterable section rdmamig moves.
RAM_IDSTR = "ram"
#: Bytes kept before the caller is asked to feed again (a device state this large
#: is not a precopy stream of a VM).
MAX_DEVICE_STATE = 256 << 20


class Phase(enum.Enum):
    """Where the decoder is."""

    HEADER = "header"
    CONFIGURATION = "configuration"
    SECTION = "section"
    SETUP = "ram setup"
    RECORDS = "ram records"
    FOOTER = "section footer"
    DEVICE_STATE = "device state"


@attrs.frozen(kw_only=True)
class RamSection:
    """The ``ram`` section's entry: what a replay of the stream names it by."""

    section_id: int
    instance_id: int
    version_id: int
    #: Whether its sections end with a footer (machine types since 2.4 do).
    footers: bool = True


class PrecopyDecoder:
    """Decodes one precopy stream.

    Args:
        on_setup: called with the block list once the ram setup is read (the
            blocks are made there); returns where their pages go.

    A ``HOOK`` record (over RDMA, where QEMU's destination enters its registration
    loop) needs nothing of the decoder: rdmamig's destination serves registrations
    whenever they come.
    """

    def __init__(self, on_setup: Callable[[list[RamBlockInfo]], RecordSink]) -> None:
        self._on_setup = on_setup
        self.sink: RecordSink | None = None
        self.phase = Phase.HEADER
        self.configuration: Configuration | None = None
        self.blocks: list[RamBlockInfo] = []
        self.ram_section: RamSection | None = None
        #: Iterations seen: the PART sections of ``ram``.
        self.parts = 0
        #: Whether the source sent MIG_CMD_SWITCHOVER_START before the END (QEMU 10).
        self.switchover_start = False
        self.device_state: DeviceState | None = None
        self._buffer = bytearray()
        self._consumed = 0  # stream offset of the buffer's first byte
        self._section: SectionHeader | None = None
        self._current: int | None = None
        self._tail: DeviceStateTail | None = None
        self._ended = False
        # The ram setup as far as it is decoded: MEM_SIZE not yet given to a block
        # (None before MEM_SIZE), and the names listed.
        self._setup_left: int | None = None
        self._setup_names: set[str] = set()

    @property
    def offset(self) -> int:
        """Bytes of the stream taken so far."""
        return self._consumed + len(self._buffer) + (len(self._tail) if self._tail else 0)

    @property
    def in_device_state(self) -> bool:
        """Whether the RAM is done and the rest is device state."""
        return self.phase is Phase.DEVICE_STATE

    def stream_complete(self) -> bool:
        """Whether the stream has ended as QEMU ends one: the device state is done
        and ends with the VM description (a stream without one ends only where its
        channel does)."""
        return self._tail is not None and self._tail.complete()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the stream.

        Raises:
            RemoteProtocolError: they break the stream (named by offset).
        """
        if self._ended:
            raise StreamError(f"{len(data)} bytes", at=self.offset,
                              reason="after the end of the stream")
        if self.phase is Phase.DEVICE_STATE:
            self._take_tail(data)
            return
        if self._buffer:
            self._buffer += data
            view = memoryview(self._buffer)
        else:
            view = memoryview(data).cast("B")
        at = self._advance(view)
        rest = view[at:]
        if self.in_device_state:  # reached now
            self._buffer = bytearray()
            self._consumed += at
            self._tail = DeviceStateTail(self._consumed)
            self._take_tail(rest)
            return
        self._buffer = bytearray(rest)
        self._consumed += at

    def read_all(self, next_piece: Callable[[], bytes | bytearray | memoryview | None]
                 ) -> DeviceState:
        """Feed what ``next_piece`` returns until the stream ends as QEMU ends one or
        ``next_piece`` returns None (its channel ended: QEMU ends a migration by
        disconnecting); returns the device state (:meth:`finish`).

        Raises:
            RemoteProtocolError: the stream is malformed or ended early.
        """
        while not self.stream_complete():
            piece = next_piece()
            if piece is None:
                break
            self.feed(piece)
        return self.finish()

    def origin(self) -> QemuOrigin:
        """What replaying this stream needs beside RAM and device state, once it is
        finished: the one place a stream's :class:`QemuOrigin` is made.

        Raises:
            RemoteProtocolError: the stream had no configuration section (every
                machine type QEMU migrates since 2.x sends one), or what it says of
                the VM is not what a stream carries (:meth:`QemuOrigin.check`).
        """
        if self.configuration is None:
            raise RemoteProtocolError("the stream has no configuration section (machine "
                                      "type); rdmamig cannot replay it")
        assert self.ram_section is not None and self.device_state is not None
        section = self.ram_section
        origin = QemuOrigin(machine=self.configuration.machine,
                            configuration=self.configuration.raw,
                            ram_section_id=section.section_id,
                            ram_instance_id=section.instance_id,
                            ram_version_id=section.version_id, footers=section.footers,
                            devices=tuple(self.device_state.devices()),
                            switchover_start=self.switchover_start)
        try:
            origin.check()  # the device names come from the peer's VM description
        except ImageError as exc:
            raise RemoteProtocolError(f"the stream's {exc}") from None
        return origin

    def finish(self) -> DeviceState:
        """The stream has ended: check it ended where a stream may; returns the
        device state.

        Raises:
            TruncatedError: it ended early (names the phase and the offset).
            RemoteProtocolError: the device state is malformed.
        """
        self._ended = True
        if self.phase is not Phase.DEVICE_STATE:
            raise TruncatedError(self.phase.value, at=self._consumed,
                                 reason=f"the stream ends {len(self._buffer)} bytes into it, at "
                                        f"offset {self.offset} (truncated)", offset=self._consumed)
        assert self._tail is not None
        self.device_state = self._tail.finish()
        return self.device_state

    def _take_tail(self, data: bytes | bytearray | memoryview) -> None:
        assert self._tail is not None
        if len(self._tail) + len(data) > MAX_DEVICE_STATE:
            raise StreamError("device state", at=self._tail.offset,
                              reason=f"more than {MAX_DEVICE_STATE} bytes")
        self._tail.feed(data)

    # ------------------------------------------------------------ the walk

    def _advance(self, buf: memoryview) -> int:
        """Decode what ``buf`` holds whole; returns where the first incomplete
        part starts."""
        at = 0
        try:
            while self.phase is not Phase.DEVICE_STATE:
                after = self._step(buf, at)
                if after is None:
                    return at
                at = after
        except TruncatedError as exc:
            return exc.offset
        except StreamError as exc:
            raise exc.shifted(self._consumed) from None
        return at

    def _step(self, buf: memoryview, at: int) -> int | None:
        phase = self.phase
        if phase is Phase.HEADER:
            at = stream.decode_header_untrusted(buf, at)
            self.phase = Phase.CONFIGURATION
            return at
        if phase is Phase.CONFIGURATION:
            if stream.kind_at_untrusted(buf, at) is Kind.CONFIGURATION:
                self.configuration, at = stream.decode_configuration_untrusted(buf, at)
            self.phase = Phase.SECTION
            return at
        if phase is Phase.SECTION:
            return self._section_start(buf, at)
        if phase is Phase.SETUP:
            return self._setup_step(buf, at)
        if phase is Phase.RECORDS:
            assert self.sink is not None  # the setup came first
            stop, at_after, self._current = ram.decode_records_untrusted(
                buf, at, self.blocks, self.sink, current=self._current)
            if stop is Stop.NEED_MORE:
                return None if at_after == at else at_after
            if stop is Stop.HOOK:
                return at_after
            self.phase = Phase.FOOTER
            return at_after
        assert phase is Phase.FOOTER and self._section is not None
        assert self.ram_section is not None
        # After EOS comes a footer or the next section (0x7e is no section type).
        footer = stream.has_footer(buf, at)
        if self._section.kind is Kind.SECTION_START:
            self.ram_section = attrs.evolve(self.ram_section, footers=footer)
        if footer:
            at = stream.decode_footer_untrusted(buf, at, self._section.section_id)
        self.phase = (Phase.DEVICE_STATE if self._section.kind is Kind.SECTION_END
                      else Phase.SECTION)
        return at

    def _setup_step(self, buf: memoryview, at: int) -> int:
        """The setup's ``MEM_SIZE``, or one more block of its list, or – the list
        complete – the blocks handed to ``on_setup``. One block at a time, so that a
        setup fed in pieces is decoded once, not again from its start each time."""
        if self._setup_left is None:
            self._setup_left, at = ram.decode_mem_size_untrusted(buf, at)
            return at
        if self._setup_left:
            ignore_shared = (self.configuration is not None
                             and "x-ignore-shared" in self.configuration.capabilities)
            block, at = ram.decode_setup_entry_untrusted(
                buf, at, left=self._setup_left, names=self._setup_names,
                ignore_shared=ignore_shared)
            self.blocks.append(block)
            self._setup_names.add(block.name)
            self._setup_left -= block.length
            return at
        self.sink = self._on_setup(self.blocks)
        self.phase = Phase.RECORDS
        return at

    def _section_start(self, buf: memoryview, at: int) -> int:
        kind = stream.kind_at_untrusted(buf, at)
        if kind is Kind.COMMAND:
            command, data, after = stream.decode_command_untrusted(buf, at)
            if command is not stream.Command.SWITCHOVER_START or data:
                raise StreamError(f"command={int(command)}", at=at + 1,
                                  reason=f"{command.name}, a QEMU_VM_COMMAND that precopy RAM "
                                         "migration does not send (postcopy, COLO, return path)")
            self.switchover_start = True
            return after
        if kind is Kind.EOF:
            raise StreamError("section type=0x00", at=at, reason="EOF before the ram section ended")
        header, after = stream.decode_section_header_untrusted(buf, at)
        if header.kind is Kind.SECTION_FULL:
            raise StreamError(f"section {header.idstr!r}", at=at,
                              reason="device state (FULL) before the ram section's END; rdmamig "
                                     "moves streams whose devices follow the RAM")
        if header.kind is Kind.SECTION_START:
            if header.idstr != RAM_IDSTR:
                raise StreamError(f"section {header.idstr!r}", at=at,
                                  reason="an iterable section other than 'ram' (block migration, "
                                         "dirty bitmaps, VFIO), not supported")
            if self.ram_section is not None:
                raise StreamError("section 'ram'", at=at, reason="started twice")
            self.ram_section = RamSection(section_id=header.section_id,
                                          instance_id=header.instance_id or 0,
                                          version_id=header.version_id or 0)
            self._section = header
            self.phase = Phase.SETUP
            return after
        if self.ram_section is None or header.section_id != self.ram_section.section_id:
            raise StreamError(f"section_id={header.section_id}", at=at + 1,
                              reason=f"{header.kind.name} of a section that did not start")
        self._section = header
        self.parts += header.kind is Kind.SECTION_PART
        self.phase = Phase.RECORDS
        return after

