"""Capability negotiation: the 8-byte private-data block of the connection.

The source asks for a set of flags; the destination grants the subset it supports;
a flag cleared by the destination is off on both sides. Bits unknown to us are cleared
without error. A version we cannot speak is refused with a clear reason; a newer
version negotiates down to what version 1 can do (PROTOCOL.md, "Connection setup").
"""

from __future__ import annotations

import enum
import struct

import attrs

from .errors import RemoteProtocolError

PROTOCOL_VERSION = 1

# version (u32), flags (u32)
PRIVATE_DATA = struct.Struct("!II")


class Capability(enum.IntFlag):
    """Capability bits. 0x01 is the protocol's; the others are rdmamig extensions
    (docs/protocol-extensions.md), off unless both sides set them."""

    PIN_ALL = 0x01
    #: Array messages (COMPRESS, REGISTER / UNREGISTER REQUEST) may carry repeat > 1.
    BATCH = 0x0001_0000
    #: Block hashes are compared after transfer (BLOCK HASHES / VERIFY RESULT).
    VERIFY = 0x0002_0000
    #: A few dirty pages of an unregistered chunk may travel inside PAGES messages.
    INLINE = 0x0004_0000
    #: Both sides prove a pre-shared key before anything else (AUTH messages).
    AUTH = 0x0008_0000
    #: The source calls a migration done only once the destination says it has
    #: committed it (COMMIT / COMMIT RESULT).
    COMMIT = 0x0010_0000
    #: ERROR carries its sender's reason (UTF-8).
    REASONS = 0x0020_0000
    #: The source sends the hashes of chunks as their data becomes final (CHUNK
    #: HASHES), so both sides verify while the data moves.
    CHUNK_HASHES = 0x0040_0000


KNOWN_CAPABILITIES = (Capability.PIN_ALL | Capability.BATCH | Capability.VERIFY
                      | Capability.INLINE | Capability.AUTH | Capability.COMMIT
                      | Capability.REASONS | Capability.CHUNK_HASHES)
#: What an rdmamig source asks for unless told otherwise (PIN_ALL is the policy's
#: call, AUTH comes with a key).
SOURCE_DEFAULTS = (Capability.BATCH | Capability.VERIFY | Capability.INLINE | Capability.COMMIT
                   | Capability.REASONS | Capability.CHUNK_HASHES)
#: How a source gets a capability a destination may require.
REQUIRED_HINTS = {Capability.AUTH: "with the same pre-shared key, --psk-file"}


def is_qemu(*, requested: Capability, granted: Capability) -> bool:
    """Whether a destination that granted ``granted`` when asked for ``requested``
    is an unmodified QEMU: asked for rdmamig's extensions, an rdmamig destination
    grants them, and QEMU knows only PIN_ALL."""
    return bool(requested & SOURCE_DEFAULTS) and not granted & SOURCE_DEFAULTS


@attrs.frozen
class PrivateData:
    """The connect request / accept reply block: ``version`` and ``flags``."""

    version: int = PROTOCOL_VERSION
    flags: int = 0

    def encode(self) -> bytes:
        """The 8 bytes that travel as connection private data."""
        return PRIVATE_DATA.pack(self.version, self.flags)

    @classmethod
    def decode_untrusted(cls, data: bytes) -> PrivateData:
        """Parse a peer's private data (at least 8 bytes; RDMA CM pads it to 56).

        Raises:
            RemoteProtocolError: fewer than 8 bytes.
        """
        if len(data) < PRIVATE_DATA.size:
            raise RemoteProtocolError(
                f"private data is too short: {len(data)} bytes at offset 0, need 8"
            )
        version, flags = PRIVATE_DATA.unpack_from(data)
        return cls(version=version, flags=flags)


def _check_version(version: int) -> None:
    if version == 0:
        raise RemoteProtocolError(
            f"invalid protocol version: version={version} at offset 0 "
            f"(this side speaks version {PROTOCOL_VERSION})"
        )


def accept(request: PrivateData, *, supported: Capability,
           required: Capability = Capability(0)) -> PrivateData:
    """Destination side: answer a connect request.

    Grants the requested flags that are both known and ``supported``.

    Raises:
        RemoteProtocolError: the requested version is invalid (0), or the request
            lacks a ``required`` flag (a key-protected destination requires AUTH).
    """
    _check_version(request.version)
    missing = Capability(int(required) & ~request.flags)
    if missing:
        raise RemoteProtocolError(f"flags={request.flags:#x} at offset 4: this destination "
                                  f"requires {missing.name} (offered by a source "
                                  f"{REQUIRED_HINTS.get(missing, 'that has it')})")
    granted = Capability(request.flags & int(KNOWN_CAPABILITIES) & int(supported))
    return PrivateData(version=PROTOCOL_VERSION, flags=int(granted))


def confirm(requested: Capability, reply: PrivateData) -> Capability:
    """Source side: the capabilities in force after the destination's reply.

    A flag the destination cleared is off; a flag it set that we never asked for is
    ignored, as are unknown bits.

    Raises:
        RemoteProtocolError: the reply's version is invalid (0).
    """
    _check_version(reply.version)
    return Capability(int(requested) & reply.flags & int(KNOWN_CAPABILITIES))
