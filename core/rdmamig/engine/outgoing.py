"""What the source writes into the QEMU FILE stream around its rounds: rdmamig's own
records (:class:`NativeStream`, for an rdmamig destination) or QEMU's migration
stream (:class:`QemuStream`, for an unmodified QEMU destination).

QEMU's destination reads its stream and, at each ``HOOK`` record, serves
registrations until REGISTER FINISHED, taking no stream bytes meanwhile (QEMU's
``rdma_registration_handle``). So a QEMU stream is flushed right after each HOOK, and
the source's control exchanges for a round – RAM BLOCKS, REGISTER, COMPRESS, REGISTER
FINISHED – happen between that HOOK and the round's EOS, as QEMU's own RDMA source
does them (``ram_control_before_iterate`` / ``after_iterate`` in QEMU's ``ram.c``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .. import wire
from ..errors import ConfigurationError
from ..memory import RamBlock
from ..qemu import ram as qemu_ram
from ..qemu import stream as qemu_stream
from ..qemu.origin import QemuOrigin
from ..qemu.stream import Kind, SectionHeader
from ..session import ControlSession, QemuFileWriter
from . import stream


class OutgoingStream(Protocol):
    """The source's stream, around the block exchange and every round."""

    #: Whether the destination sends READY once it has processed the end (rdmamig's
    #: does; a QEMU destination just closes).
    final_ready: bool
    #: The kind of destination it is for (:attr:`.config.SourceResult.peer`).
    peer: str

    def start(self, writer: QemuFileWriter, blocks: Sequence[RamBlock]) -> None:
        """What goes before RAM BLOCKS REQUEST (the block list), sent."""

    def after_blocks(self, writer: QemuFileWriter, session: ControlSession) -> None:
        """After RAM BLOCKS RESULT."""

    def begin_round(self, writer: QemuFileWriter, *, last: bool) -> None:
        """Before a round's registrations and writes."""

    def end_round(self, writer: QemuFileWriter, *, last: bool) -> None:
        """After a round's REGISTER FINISHED."""

    def finish(self, writer: QemuFileWriter, state: bytes) -> None:
        """The state after the RAM and the end, sent."""


class NativeStream:
    """rdmamig's records (:mod:`.stream`): BLOCKS (and ORIGIN) first, STATE and END
    last, nothing around the rounds."""

    final_ready = True
    peer = "rdmamig"

    def __init__(self, origin: Mapping[str, Any] | None = None) -> None:
        self.origin = origin

    def start(self, writer: QemuFileWriter, blocks: Sequence[RamBlock]) -> None:
        writer.write(stream.MAGIC)
        stream.write_record(writer, stream.Tag.BLOCKS,
                            stream.encode_blocks([(b.name, b.length) for b in blocks]))
        if self.origin is not None:
            stream.write_record(writer, stream.Tag.ORIGIN, stream.encode_origin(dict(
                self.origin)))
        writer.flush()

    def after_blocks(self, writer: QemuFileWriter, session: ControlSession) -> None:
        pass

    def begin_round(self, writer: QemuFileWriter, *, last: bool) -> None:
        pass

    def end_round(self, writer: QemuFileWriter, *, last: bool) -> None:
        pass

    def finish(self, writer: QemuFileWriter, state: bytes) -> None:
        stream.write_record(writer, stream.Tag.STATE, state)
        stream.write_record(writer, stream.Tag.END)
        writer.flush()


class QemuStream:
    """QEMU's migration stream for an image that came from QEMU: its header and
    configuration, the ``ram`` section (START with the block list, a PART per round
    and END for the last, each with a HOOK), then the image's device state verbatim.

    Args:
        origin: the image's QEMU metadata.
        addrs: each block's guest address (``x-ignore-shared``), or None.
    """

    final_ready = False
    peer = "qemu"

    def __init__(self, origin: QemuOrigin, addrs: Sequence[int | None] = ()) -> None:
        self.origin = origin
        self.addrs = list(addrs)
        self._footer = (qemu_stream.encode_footer(origin.ram_section_id) if origin.footers
                        else b"")

    def start(self, writer: QemuFileWriter, blocks: Sequence[RamBlock]) -> None:
        addrs = self.addrs or [None] * len(blocks)
        writer.write(qemu_stream.encode_header() + self.origin.configuration)
        writer.write(qemu_stream.encode_section_header(SectionHeader(
            kind=Kind.SECTION_START, section_id=self.origin.ram_section_id, idstr="ram",
            instance_id=self.origin.ram_instance_id, version_id=self.origin.ram_version_id)))
        writer.write(qemu_ram.encode_setup([
            qemu_ram.RamBlockInfo(name=b.name, length=b.length, addr=addr)
            for b, addr in zip(blocks, addrs, strict=True)]))
        writer.write(qemu_ram.encode_hook())
        writer.flush()

    def after_blocks(self, writer: QemuFileWriter, session: ControlSession) -> None:
        # The setup's registration loop ends here (QEMU's registration_stop).
        session.exchange_send(wire.RegisterFinished())
        writer.write(qemu_ram.encode_eos() + self._footer)

    def begin_round(self, writer: QemuFileWriter, *, last: bool) -> None:
        if last and self.origin.switchover_start:
            writer.write(qemu_stream.encode_command(qemu_stream.Command.SWITCHOVER_START))
        kind = Kind.SECTION_END if last else Kind.SECTION_PART
        writer.write(qemu_stream.encode_section_header(SectionHeader(
            kind=kind, section_id=self.origin.ram_section_id)))
        writer.write(qemu_ram.encode_hook())
        writer.flush()

    def end_round(self, writer: QemuFileWriter, *, last: bool) -> None:
        writer.write(qemu_ram.encode_eos() + self._footer)

    def finish(self, writer: QemuFileWriter, state: bytes) -> None:
        writer.write(state)
        writer.flush()


def outgoing_for(origin: Mapping[str, Any] | None, *, qemu_peer: bool) -> OutgoingStream:
    """The stream for blocks of ``origin`` (an ORIGIN record, or None) to a peer:
    QEMU's own stream to a QEMU destination, rdmamig's otherwise.

    Raises:
        ConfigurationError: a QEMU destination, and the blocks are no QEMU image (a
            QEMU destination needs the device state only a QEMU source makes).
    """
    if not qemu_peer:
        return NativeStream(origin)
    if origin is None or not origin.get("qemu"):
        raise ConfigurationError("the destination is a QEMU (it offers none of rdmamig's "
                                 "extensions): send it a migration image that came from "
                                 "QEMU (rdmamig send --image DIR)")
    return QemuStream(QemuOrigin.from_json(origin["qemu"]), origin.get("addrs") or ())
