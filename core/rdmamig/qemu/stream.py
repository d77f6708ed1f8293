"""The framing of QEMU's migration stream (``migration/savevm.c``), sans IO.

What a precopy migration writes::

    "QEVM" version(u32 = 3)
    CONFIGURATION(0x07) len(u32) machine-type [subsections]
    START(0x01) section_id(u32) idstr instance_id(u32) version_id(u32)  <ram setup>  FOOTER
    PART(0x02) section_id(u32)  <ram records>  FOOTER        (once per iteration)
    END(0x03) section_id(u32)  <ram records>  FOOTER
    FULL(0x04) ... (each device's state) ... EOF(0x00)
    VMDESCRIPTION(0x06) len(u32) JSON

QEMU 10 also sends a ``COMMAND(0x08) cmd(u16) len(u16) data`` right before the END
section: MIG_CMD_SWITCHOVER_START (11, no data), the only command of a precopy
migration; rdmamig keeps that it came and refuses every other command (postcopy,
COLO, return path). A footer is ``0x7e`` and the section id again (absent on old
machine types). Names
are a u8 length and that many bytes. The device sections carry no length: their
content is defined by each device's VMState. rdmamig keeps everything from the
first ``FULL`` after the ram section's ``END`` to the end of the stream – the device
state – as opaque bytes, and only finds the VM description at its end.

Decoders of peer bytes raise only :class:`~rdmamig.errors.RemoteProtocolError`
(:class:`~rdmamig.errors.TruncatedError` when the bytes end inside a record), naming
the field, its value and the offset.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any, Final

import attrs

from ..errors import StreamError, TruncatedError
from .fields import decode_name_untrusted, encode_name, need_bytes

MAGIC: Final = b"QEVM"
#: QEMU_VM_FILE_VERSION (version 2 streams predate QEMU 1.2 and are refused).
VERSION: Final = 3
# magic (4 bytes), version (u32)
HEADER = struct.Struct("!4sI")
U32 = struct.Struct("!I")
#: Longest machine type name accepted (QEMU's are under 40 bytes).
MAX_MACHINE: Final = 256
#: Most migration capabilities a configuration may list.
MAX_CAPABILITIES: Final = 64
#: Longest VM description accepted.
MAX_DESCRIPTION: Final = 64 << 20


class Kind(enum.IntEnum):
    """The byte that starts each part of the stream (``QEMU_VM_*``)."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


def kind_at_untrusted(buf: memoryview, at: int) -> Kind:
    """The record type at ``at``.

    Raises:
        TruncatedError: the bytes end there.
        RemoteProtocolError: an unknown type.
    """
    need_bytes(buf, at, 1, "section type", at)
    try:
        return Kind(buf[at])
    except ValueError:
        raise StreamError(f"section type={buf[at]:#x}", at=at, reason="unknown") from None


# ---------------------------------------------------------------- header


def decode_header_untrusted(buf: memoryview, at: int = 0) -> int:
    """Check the stream's header; returns the offset after it.

    Raises:
        RemoteProtocolError: not a QEMU migration stream, or another version.
    """
    need_bytes(buf, at, HEADER.size, "stream header", at)
    magic, version = HEADER.unpack_from(buf, at)
    if magic != MAGIC:
        raise StreamError(f"magic={bytes(magic)!r}", at=at,
                          reason="not a QEMU migration stream (QEVM)")
    if version != VERSION:
        raise StreamError(f"version={version}", at=at + 4,
                          reason=f"rdmamig reads version {VERSION} streams")
    return at + HEADER.size


def encode_header() -> bytes:
    """The stream's header."""
    return HEADER.pack(MAGIC, VERSION)


# ---------------------------------------------------------------- configuration


@attrs.frozen(kw_only=True)
class Configuration:
    """The configuration section: the machine type and what must match.

    Attributes:
        machine: the source's machine type (``pc-i440fx-7.2``).
        capabilities: migration capabilities the destination must also have on.
        target_page_bits: sent only where the page size varies by machine.
        uuid: the VM's UUID (``validate-uuid``).
        raw: the section's bytes, replayed as they came.
    """

    machine: str
    capabilities: tuple[str, ...] = ()
    target_page_bits: int | None = None
    uuid: bytes | None = None
    raw: bytes = b""


def decode_configuration_untrusted(buf: memoryview, at: int) -> tuple[Configuration, int]:
    """The configuration section at ``at``; returns it and the offset after it.

    Raises:
        TruncatedError: the bytes end inside it.
        RemoteProtocolError: malformed, or a subsection rdmamig does not know.
    """
    start = at
    if kind_at_untrusted(buf, at) is not Kind.CONFIGURATION:
        raise StreamError(f"section type={buf[at]:#x}", at=at,
                          reason="expected the configuration (0x07)")
    need_bytes(buf, at + 1, U32.size, "machine type length", start)
    (size,) = U32.unpack_from(buf, at + 1)
    if not 0 < size <= MAX_MACHINE:
        raise StreamError(f"len={size}", at=at + 1,
                          reason=f"a machine type of 1 to {MAX_MACHINE} bytes expected")
    at += 1 + U32.size
    need_bytes(buf, at, size, "machine type", start)
    machine = bytes(buf[at:at + size]).decode("ascii", "replace")
    at += size
    fields: dict[str, Any] = {}
    while kind_at_untrusted(buf, at) is Kind.SUBSECTION:
        name, at = decode_name_untrusted(buf, at + 1, "configuration subsection name", start)
        need_bytes(buf, at, U32.size, f"version of {name!r}", start)
        at += U32.size
        at = _subsection(buf, at, name, fields, start)
    return Configuration(machine=machine, raw=bytes(buf[start:at]), **fields), at


def _subsection(buf: memoryview, at: int, name: str, fields: dict[str, Any],
                start: int) -> int:
    if name == "configuration/target-page-bits":
        need_bytes(buf, at, U32.size, name, start)
        (fields["target_page_bits"],) = U32.unpack_from(buf, at)
        return at + U32.size
    if name == "configuration/capabilities":
        need_bytes(buf, at, U32.size, "capability count", start)
        (count,) = U32.unpack_from(buf, at)
        if count > MAX_CAPABILITIES:
            raise StreamError(f"caps_count={count}", at=at, reason=f"more than {MAX_CAPABILITIES}")
        at += U32.size
        capabilities = []
        for _ in range(count):
            capability, at = decode_name_untrusted(buf, at, "capability", start)
            capabilities.append(capability)
        fields["capabilities"] = tuple(capabilities)
        return at
    if name == "configuration/uuid":
        need_bytes(buf, at, 16, name, start)
        fields["uuid"] = bytes(buf[at:at + 16])
        return at + 16
    raise StreamError(f"subsection {name!r}", at=at,
                      reason="a configuration subsection rdmamig does not know")


def encode_configuration(machine: str) -> bytes:
    """A configuration section naming only the machine type."""
    raw = machine.encode("ascii")
    return bytes([Kind.CONFIGURATION]) + U32.pack(len(raw)) + raw


# ---------------------------------------------------------------- sections


@attrs.frozen(kw_only=True)
class SectionHeader:
    """The head of a section. START and FULL name their entry; PART and END only
    repeat the section id."""

    kind: Kind
    section_id: int
    idstr: str | None = None
    instance_id: int | None = None
    version_id: int | None = None


def decode_section_header_untrusted(buf: memoryview, at: int) -> tuple[SectionHeader, int]:
    """A START, PART, END or FULL section header at ``at``.

    Raises:
        TruncatedError: the bytes end inside it.
        RemoteProtocolError: another kind of record is there.
    """
    start = at
    kind = kind_at_untrusted(buf, at)
    if kind not in (Kind.SECTION_START, Kind.SECTION_PART, Kind.SECTION_END,
                    Kind.SECTION_FULL):
        raise StreamError(f"section type={int(kind):#x}", at=at,
                          reason=f"{kind.name}, where a section was expected")
    need_bytes(buf, at + 1, U32.size, "section id", start)
    (section_id,) = U32.unpack_from(buf, at + 1)
    at += 1 + U32.size
    if kind in (Kind.SECTION_PART, Kind.SECTION_END):
        return SectionHeader(kind=kind, section_id=section_id), at
    idstr, at = decode_name_untrusted(buf, at, "section idstr", start)
    need_bytes(buf, at, 2 * U32.size, f"instance and version of section {idstr!r}", start)
    instance_id, version_id = struct.unpack_from("!II", buf, at)
    return SectionHeader(kind=kind, section_id=section_id, idstr=idstr,
                         instance_id=instance_id, version_id=version_id), at + 2 * U32.size


def encode_section_header(header: SectionHeader) -> bytes:
    """The bytes of ``header``."""
    head = bytes([header.kind]) + U32.pack(header.section_id)
    if header.kind in (Kind.SECTION_PART, Kind.SECTION_END):
        return head
    assert header.idstr is not None
    return (head + encode_name(header.idstr)
            + struct.pack("!II", header.instance_id or 0, header.version_id or 0))


def decode_footer_untrusted(buf: memoryview, at: int, section_id: int) -> int:
    """The footer of section ``section_id`` at ``at``.

    Raises:
        TruncatedError, RemoteProtocolError: it is not there, or names another section.
    """
    need_bytes(buf, at, 1 + U32.size, "section footer", at)
    if buf[at] != Kind.SECTION_FOOTER:
        raise StreamError(f"section type={buf[at]:#x}", at=at,
                          reason=f"expected the footer of section {section_id}")
    (found,) = U32.unpack_from(buf, at + 1)
    if found != section_id:
        raise StreamError(f"section_id={found}", at=at + 1,
                          reason=f"the footer of section {section_id} expected")
    return at + 1 + U32.size


def has_footer(buf: memoryview, at: int) -> bool:
    """Whether a footer starts at ``at`` (machine types before 2.4 send none).

    Raises:
        TruncatedError: the stream ends there.
    """
    need_bytes(buf, at, 1, "section footer or next section", at)
    return buf[at] == Kind.SECTION_FOOTER


def encode_footer(section_id: int) -> bytes:
    """The footer of section ``section_id``."""
    return bytes([Kind.SECTION_FOOTER]) + U32.pack(section_id)


# ---------------------------------------------------------------- commands

# command (u16), length (u16)
COMMAND = struct.Struct("!HH")


class Command(enum.IntEnum):
    """QEMU_VM_COMMAND's sub-commands (``enum qemu_vm_cmd`` of ``savevm.c``)."""

    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    POSTCOPY_RESUME = 7
    PACKAGED = 8
    RECV_BITMAP = 9
    ENABLE_COLO = 10
    SWITCHOVER_START = 11


def decode_command_untrusted(buf: memoryview, at: int) -> tuple[Command, bytes, int]:
    """A QEMU_VM_COMMAND at ``at``: the command, its data and the offset after it.

    Raises:
        TruncatedError: the bytes end inside it.
        RemoteProtocolError: an unknown command.
    """
    need_bytes(buf, at, 1 + COMMAND.size, "command", at)
    number, size = COMMAND.unpack_from(buf, at + 1)
    need_bytes(buf, at + 1 + COMMAND.size, size, "command data", at)
    try:
        command = Command(number)
    except ValueError:
        raise StreamError(f"command={number}", at=at + 1,
                          reason="an unknown QEMU_VM_COMMAND") from None
    end = at + 1 + COMMAND.size + size
    return command, bytes(buf[at + 1 + COMMAND.size:end]), end


def encode_command(command: Command, data: bytes = b"") -> bytes:
    """A QEMU_VM_COMMAND record."""
    return bytes([Kind.COMMAND]) + COMMAND.pack(command, len(data)) + data


# ---------------------------------------------------------------- the end


@attrs.frozen(kw_only=True)
class DeviceState:
    """The stream after the last RAM: device sections, EOF and the VM description,
    kept as they came.

    Attributes:
        raw: the bytes, from the first device section to the end of the stream.
        description: the VM description's JSON (``scripts/analyze-migration.py``
            reads it), or None when the machine suppresses it.
    """

    raw: bytes
    description: dict[str, Any] | None

    def devices(self) -> list[str]:
        """The device sections the description lists (``name`` / ``instance_id``)."""
        if self.description is None:
            return []
        return [f"{d.get('name')}/{d.get('instance_id', 0)}"
                for d in self.description.get("devices", []) if isinstance(d, dict)]


class DeviceStateTail:
    """The rest of a stream from its first device section, taken as it arrives, and
    told complete once it ends as QEMU ends a stream: EOF, then the VM description
    (``VMDESCRIPTION``, a u32 length and that much JSON), or EOF alone where the
    channel ends.

    Linear in what it is given: each byte is searched once for an EOF + VMDESCRIPTION
    pair, each pair remembered by where its description would end, and JSON is
    parsed only for a pair that ends where the bytes do – at most about as many
    bytes in all as were given (then only :meth:`finish` parses).

    Args:
        offset: where the tail starts in the stream, for messages.
    """

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self._raw = bytearray()
        self._search_from = 0
        #: Where a description would end -> where its VMDESCRIPTION byte is (the last
        #: such pair wins, as the last is what QEMU wrote).
        self._ends: dict[int, int] = {}
        self._parsed = 0
        self._described: DeviceState | None = None

    def __len__(self) -> int:
        return len(self._raw)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take the next bytes of the tail.

        Raises:
            StreamError: it does not start with a device section (FULL).
        """
        if not self._raw and len(data) and data[0] != Kind.SECTION_FULL:
            raise StreamError(f"section type={data[0]:#x}", at=self.offset,
                              reason="the device state starts with a FULL section (0x04)")
        self._raw += data
        self._described = None
        pair = bytes([Kind.EOF, Kind.VMDESCRIPTION])
        at = self._raw.find(pair, self._search_from)
        while at >= 0 and at + 6 <= len(self._raw):
            (size,) = U32.unpack_from(self._raw, at + 2)
            self._ends[at + 6 + size] = at + 1
            at = self._raw.find(pair, at + 1)
        self._search_from = at if at >= 0 else max(len(self._raw) - 1, 0)

    def complete(self) -> bool:
        """Whether the bytes so far end with a VM description that parses."""
        at = self._ends.get(len(self._raw))
        if at is None or len(self._raw) - at - 5 > MAX_DESCRIPTION:
            return False
        if self._described is not None:
            return True
        self._parsed += len(self._raw) - at
        if self._parsed > len(self._raw) + (1 << 20):
            return False  # a peer feeding near-descriptions: leave it to finish()
        try:
            self._described = self._describe(at)
        except StreamError:
            return False
        return True

    def finish(self) -> DeviceState:
        """The stream has ended here: the device state.

        Raises:
            TruncatedError: it does not end with EOF or a whole VM description.
            StreamError: no device section, or the description is bad.
        """
        if not self._raw:
            raise StreamError("section type=nothing", at=self.offset,
                              reason="the device state starts with a FULL section (0x04)")
        at = self._ends.get(len(self._raw))
        if at is not None:
            return self._described or self._describe(at)
        if self._raw[-1] == Kind.EOF:
            return DeviceState(raw=bytes(self._raw), description=None)
        raise TruncatedError("device state", at=self.offset,
                             reason=f"the stream ends after {len(self._raw)} bytes without "
                                    "EOF and the VM description", offset=self.offset)

    def _describe(self, at: int) -> DeviceState:
        size = len(self._raw) - at - 5
        if size > MAX_DESCRIPTION:
            raise StreamError(f"len={size}", at=self.offset + at + 1,
                              reason=f"a VM description over {MAX_DESCRIPTION} bytes")
        try:
            description = json.loads(self._raw[at + 5:])
        except ValueError as exc:
            raise StreamError("VM description", at=self.offset + at + 5,
                              reason=f"not JSON ({exc})") from None
        if not isinstance(description, dict):
            raise StreamError("VM description", at=self.offset + at + 5,
                              reason="not a JSON object")
        return DeviceState(raw=bytes(self._raw), description=description)
