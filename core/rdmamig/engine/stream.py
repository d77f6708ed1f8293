"""The records rdmamig's engine puts in the QEMU FILE stream.

The stream is opaque to the protocol; the engine uses it as QEMU uses its own: the
block list first (names and lengths, so the destination can check or create its
blocks before RAM BLOCKS REQUEST), optionally where the blocks come from (ORIGIN: a
migration image's QEMU metadata, so that the destination writes the same image),
the application's state after stop, then END. Each record is ``tag (u8), length
(u32), payload``, after an 8-byte magic.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Sequence
from typing import Any, Protocol

from ..errors import ImageError, RemoteProtocolError
from ..qemu.origin import QemuOrigin

MAGIC = b"RMIGSTR\x01"
RECORD = struct.Struct("!BI")
# name length (u16), block length (u64), then the name (UTF-8)
BLOCK_ENTRY = struct.Struct("!HQ")
#: Largest record we accept: the state is held in memory until the end, so it is
#: bounded as a QEMU stream's device state is (qemu.decoder.MAX_DEVICE_STATE).
MAX_RECORD = 256 << 20
#: Largest ORIGIN record.
MAX_ORIGIN = 1 << 20


class Tag(enum.IntEnum):
    """Record types."""

    BLOCKS = 1
    STATE = 2
    END = 3
    ORIGIN = 4


class Readable(Protocol):
    """Where records are read from (a :class:`~rdmamig.session.QemuFileReader`)."""

    def read_exact(self, size: int) -> bytes: ...


class Writable(Protocol):
    """Where records are written (a :class:`~rdmamig.session.QemuFileWriter`)."""

    def write(self, data: bytes, /) -> int: ...


def write_record(out: Writable, tag: Tag, payload: bytes = b"") -> None:
    """Append one record."""
    out.write(RECORD.pack(tag, len(payload)) + payload)


def encode_blocks(blocks: Sequence[tuple[str, int]]) -> bytes:
    """Payload of a BLOCKS record: every block's name and length."""
    parts = [struct.pack("!I", len(blocks))]
    for name, length in blocks:
        raw = name.encode()
        parts.append(BLOCK_ENTRY.pack(len(raw), length) + raw)
    return b"".join(parts)


def decode_blocks_untrusted(payload: bytes) -> list[tuple[str, int]]:
    """The block list of a BLOCKS record.

    Raises:
        RemoteProtocolError: truncated, trailing bytes or a name that is not UTF-8.
    """
    try:
        (count,) = struct.unpack_from("!I", payload)
        at, blocks = 4, []
        for _ in range(count):
            name_length, length = BLOCK_ENTRY.unpack_from(payload, at)
            at += BLOCK_ENTRY.size
            raw = payload[at:at + name_length]
            if len(raw) != name_length:
                raise struct.error("truncated name")
            blocks.append((raw.decode(), length))
            at += name_length
    except (struct.error, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"BLOCKS record of {len(payload)} bytes is malformed: "
                                  f"{exc}") from None
    if at != len(payload):
        raise RemoteProtocolError(f"BLOCKS record has {len(payload) - at} trailing bytes")
    return blocks


def encode_origin(origin: dict[str, Any]) -> bytes:
    """Payload of an ORIGIN record: a JSON object."""
    return json.dumps(origin, separators=(",", ":")).encode()


def decode_origin_untrusted(payload: bytes, *, blocks: int) -> dict[str, Any]:
    """The JSON object of an ORIGIN record, checked whole: ``origin`` is ``qemu`` or
    ``rdmamig``, ``addrs`` one address or null per each of the ``blocks`` blocks
    (or none), and ``qemu`` a valid :class:`~rdmamig.qemu.origin.QemuOrigin`.

    Raises:
        RemoteProtocolError: too long, not JSON, or not such an object.
    """
    if len(payload) > MAX_ORIGIN:
        raise RemoteProtocolError(f"ORIGIN record of {len(payload)} bytes is over "
                                  f"{MAX_ORIGIN}")
    try:
        origin = json.loads(payload)
    except ValueError as exc:
        raise RemoteProtocolError(f"ORIGIN record is not JSON: {exc}") from None
    if not isinstance(origin, dict):
        raise RemoteProtocolError("ORIGIN record is not a JSON object")
    kind, addrs = origin.get("origin"), origin.get("addrs") or []
    if kind not in ("qemu", "rdmamig"):
        raise RemoteProtocolError(f"ORIGIN origin={kind!r}: neither 'qemu' nor 'rdmamig'")
    if (not isinstance(addrs, list) or len(addrs) not in (0, blocks)
            or not all(a is None or (isinstance(a, int) and 0 <= a < 2**64) for a in addrs)):
        raise RemoteProtocolError(f"ORIGIN addrs: not one address or null per block "
                                  f"({blocks})")
    if origin.get("qemu"):
        try:
            QemuOrigin.from_json(origin["qemu"])
        except ImageError as exc:
            raise RemoteProtocolError(f"ORIGIN qemu: {exc}") from None
    return origin


def read_magic(stream: Readable, start: bytes = b"") -> None:
    """Check the stream starts like rdmamig's (``start``: its first bytes, read
    already).

    Raises:
        RemoteProtocolError: it does not (a QEMU stream starts with ``QEVM``).
    """
    magic = start + stream.read_exact(len(MAGIC) - len(start))
    if magic != MAGIC:
        raise RemoteProtocolError(f"stream magic={magic!r} at offset 0: not an rdmamig "
                                  f"migration stream")


def read_record(stream: Readable) -> tuple[Tag, bytes]:
    """The next record.

    Raises:
        RemoteProtocolError: unknown tag or a length over the maximum.
    """
    tag, length = RECORD.unpack(stream.read_exact(RECORD.size))
    if tag not in Tag._value2member_map_:
        raise RemoteProtocolError(f"record tag={tag}: unknown")
    if length > MAX_RECORD:
        raise RemoteProtocolError(f"record length={length}: over {MAX_RECORD}")
    return Tag(tag), stream.read_exact(length)
